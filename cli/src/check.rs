//! `isola check`: whether this host can run isola, and what to fix.
//!
//! One line per check, `ok   <what>: <detail>` or `FAIL <what>: <what is
//! wrong and how to fix it>`; the status is 0 only when every check passed.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use isola_sandbox::config::{Config, BUILT_IN, DEFAULT_PATH};

use crate::host;

/// containerd's default socket.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The containerd shim binary containerd runs for `io.containerd.isola.v2`.
pub const SHIM: &str = "containerd-shim-isola-v2";
/// Where the kernel shows its transparent huge page settings.
pub const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

// The checks' names, in the order they are printed.
const KVM: &str = "kvm";
const DEV_KVM: &str = "/dev/kvm";
const DEV_TUN: &str = "/dev/net/tun";
const HUGEPAGES: &str = "transparent hugepages";
const CONFIG: &str = "config";
const VMM: &str = "isola-vmm";
const JAIL: &str = "jail";
const KERNEL: &str = "guest kernel";
const INITRD: &str = "guest initrd";
const VERSIONS: &str = "versions";
const VIRTIOFSD: &str = "virtiofsd";
const DEBUG: &str = "debug sessions";
const CONTAINERD: &str = "containerd";

/// How long a `--version` (or `ctr version`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// KVM's `KVM_GET_API_VERSION` ioctl (`_IO(KVMIO, 0x00)`), and the one API
/// version there is.
const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_API_VERSION: i32 = 12;
/// What the agent prints when it is ready; the version follows.
const AGENT_MARKER: &[u8] = b"isola-agent ready: version=";
/// The most an initrd may unpack to here (gzip).
const MAX_INITRD_BYTES: u64 = 1 << 30;

/// One check's outcome: `Ok(detail)` or `Err(problem and fix)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<String, String>,
}

impl Check {
    pub fn new(name: &'static str, result: Result<String, String>) -> Check {
        Check { name, result }
    }

    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }

    /// `ok   name: detail` or `FAIL name: problem`.
    pub fn line(&self) -> String {
        match &self.result {
            Ok(detail) if detail.is_empty() => format!("ok   {}", self.name),
            Ok(detail) => format!("ok   {}: {detail}", self.name),
            Err(problem) => format!("FAIL {}: {problem}", self.name),
        }
    }
}

/// `isola check`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config file; else `$ISOLA_CONFIG`, else /etc/isola/config.toml.
    pub config: Option<PathBuf>,
    pub containerd_address: PathBuf,
}

/// Runs every check, printing each line as it is known; the exit status.
pub fn run(options: &Options) -> i32 {
    let mut failed = 0;
    let mut report = |check: Check| {
        println!("{}", check.line());
        // A reader sees each line as it comes; a closed stdout is not ours
        // to report.
        let _ = std::io::stdout().flush();
        if !check.passed() {
            failed += 1;
        }
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    report(Check::new(
        KVM,
        kvm_kind(&cpuinfo, Path::new("/sys/module")),
    ));
    report(Check::new(DEV_KVM, kvm_device(Path::new("/dev/kvm"))));
    report(Check::new(DEV_TUN, tun_device(Path::new("/dev/net/tun"))));
    report(Check::new(HUGEPAGES, hugepages(Path::new(THP_DIR))));

    let config = Config::load(options.config.as_deref());
    report(Check::new(
        CONFIG,
        match &config {
            Ok(config) if config.path == Path::new(BUILT_IN) => Ok(format!(
                "built-in defaults ({DEFAULT_PATH} does not exist; configs/isola.toml is a \
                 template)"
            )),
            Ok(config) => Ok(config.path.display().to_string()),
            Err(err) => Err(err.to_string()),
        },
    ));
    match &config {
        Ok(config) => {
            let vmm = isola_vmm(config);
            report(Check::new(VMM, vmm.clone().map(|(detail, _)| detail)));
            report(Check::new(
                JAIL,
                match &vmm {
                    Ok(_) => jail(config),
                    Err(_) => Err("not checked: isola-vmm is not usable (see above)".to_string()),
                },
            ));
            report(Check::new(KERNEL, kernel(config)));
            let initrd = initrd(config);
            report(Check::new(INITRD, initrd.clone().map(|(detail, _)| detail)));
            report(Check::new(
                VERSIONS,
                versions(
                    vmm.ok().and_then(|(_, v)| v).as_deref(),
                    initrd.ok().map(|(_, v)| v).as_deref(),
                ),
            ));
            report(Check::new(VIRTIOFSD, virtiofsd(config)));
            report(Check::new(DEBUG, debug_shell(config)));
        }
        Err(_) => {
            for name in [VMM, JAIL, KERNEL, INITRD, VERSIONS, VIRTIOFSD, DEBUG] {
                report(Check::new(
                    name,
                    Err("not checked: the config did not load (see `config` above)".to_string()),
                ));
            }
        }
    }
    report(Check::new(
        CONTAINERD,
        containerd(&options.containerd_address),
    ));
    report(Check::new(SHIM, shim(&host::on_path(SHIM))));
    i32::from(failed > 0)
}

/// `isola debug`: off, or on with a static busybox to serve.
pub fn debug_shell(config: &Config) -> Result<String, String> {
    if !config.debug.console {
        return Ok("off (debug.console = false)".to_string());
    }
    let busybox = &config.debug.busybox;
    match isola_sandbox::debug::is_static_elf(busybox) {
        Ok(true) => Ok(format!("on, serving {}", busybox.display())),
        Ok(false) => Err(format!(
            "debug.busybox {} is not a static x86-64 executable: install busybox-static \
             (apt-get install busybox-static) or name another",
            busybox.display()
        )),
        Err(err) => Err(format!(
            "debug.busybox {}: {err}: install busybox-static (apt-get install \
             busybox-static) or name another",
            busybox.display()
        )),
    }
}

/// Check 1: the CPU has hardware virtualization, its KVM module is loaded
/// and `/dev/kvm` is not PVM's (which boots only PVM guest kernels).
pub fn kvm_kind(cpuinfo: &str, sys_module: &Path) -> Result<String, String> {
    let Some(flag) = host::cpu_virt_flag(cpuinfo) else {
        let pvm = if host::is_pvm(sys_module) {
            " (/dev/kvm is PVM, kvm_pvm, which boots only PVM guest kernels, not isola's)"
        } else {
            ""
        };
        return Err(format!(
            "the CPU shows neither vmx nor svm{pvm}: enable Intel VT-x or AMD-V in the \
             firmware, or nested virtualization for this VM (kvm_intel nested=1 or kvm_amd \
             nested=1 on its host)"
        ));
    };
    let module = if flag == "vmx" {
        "kvm_intel"
    } else {
        "kvm_amd"
    };
    if host::is_pvm(sys_module) {
        return Err(format!(
            "/dev/kvm is PVM (kvm_pvm), which boots only PVM guest kernels, not isola's: \
             unload it and load {module} (modprobe -r kvm_pvm && modprobe {module})"
        ));
    }
    if !sys_module.join(module).exists() {
        return Err(format!(
            "the CPU has {flag} but {module} is not loaded: modprobe {module}"
        ));
    }
    Ok(format!(
        "the CPU has {flag}, {module} is loaded, /dev/kvm is not PVM"
    ))
}

/// The group that owns `meta`'s file, by name if it has one.
fn group_name(meta: &std::fs::Metadata) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid())) {
        Ok(Some(group)) => group.name,
        _ => format!("gid {}", meta.gid()),
    }
}

/// Check 2a: `/dev/kvm` opens read-write and answers KVM's API version.
pub fn kvm_device(dev: &Path) -> Result<String, String> {
    let file = match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "{} does not exist: enable virtualization in the firmware and load kvm_intel or \
                 kvm_amd (modprobe kvm_intel)",
                dev.display()
            ))
        }
        Err(err) if err.kind() == ErrorKind::PermissionDenied => {
            let group = std::fs::metadata(dev)
                .map(|m| group_name(&m))
                .unwrap_or_else(|_| "kvm".to_string());
            return Err(format!(
                "{} is not readable and writable by this user ({err}): add the user to the group \
                 `{group}` (usermod -aG {group} USER, then log in again) or run as root",
                dev.display()
            ));
        }
        Err(err) => return Err(format!("opening {}: {err}", dev.display())),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and returns an int; the
    // descriptor is open (owned by `file`) for the whole call, and on any
    // other file the ioctl fails without touching memory.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version < 0 {
        return Err(format!(
            "{} is not a KVM device (KVM_GET_API_VERSION: {}): it should be the character \
             device 10:232 that the kvm module creates",
            dev.display(),
            std::io::Error::last_os_error()
        ));
    }
    if version != KVM_API_VERSION {
        return Err(format!(
            "{} speaks KVM API {version}, not {KVM_API_VERSION}",
            dev.display()
        ));
    }
    Ok(format!("readable and writable, KVM API {version}"))
}

/// Check 2b: `/dev/net/tun` exists and opens read-write.
pub fn tun_device(dev: &Path) -> Result<String, String> {
    match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok("readable and writable".to_string()),
        Err(err) if err.kind() == ErrorKind::NotFound => Err(format!(
            "{} does not exist: load the tun module (modprobe tun)",
            dev.display()
        )),
        Err(err) if err.kind() == ErrorKind::PermissionDenied => Err(format!(
            "{} is not readable and writable by this user ({err}): run as root",
            dev.display()
        )),
        Err(err) => Err(format!(
            "opening {}: {err} (load the tun module: modprobe tun)",
            dev.display()
        )),
    }
}

/// The selected mode of a transparent huge page setting:
/// `always [madvise] never` → `madvise`.
pub fn thp_mode(setting: &str) -> Option<&str> {
    setting
        .split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'))
}

/// Check 3: transparent huge pages. isola-vmm asks for huge pages on guest
/// RAM (`MADV_HUGEPAGE`), which is shared memory (a memfd): without them
/// the guest faults its memory in 4 KiB pages and boots markedly slower.
/// So `enabled` must be `always` or `madvise`, and `shmem_enabled` must not
/// be `never` or `deny`.
pub fn hugepages(dir: &Path) -> Result<String, String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    thp_verdict(
        dir,
        read("enabled").as_deref(),
        read("shmem_enabled").as_deref(),
    )
}

/// [`hugepages`] on the contents of `enabled` and `shmem_enabled` (None:
/// unreadable).
pub fn thp_verdict(
    dir: &Path,
    enabled: Option<&str>,
    shmem_enabled: Option<&str>,
) -> Result<String, String> {
    let Some(enabled_text) = enabled else {
        return Err(format!(
            "{} cannot be read: this kernel has no transparent huge pages, so guest RAM uses \
             4 KiB pages and boots slower (use a kernel with CONFIG_TRANSPARENT_HUGEPAGE)",
            dir.join("enabled").display()
        ));
    };
    let mut problems = Vec::new();
    let enabled = thp_mode(enabled_text);
    match enabled {
        Some("always") | Some("madvise") => {}
        Some(mode) => problems.push(format!(
            "enabled is {mode}: echo madvise > {}",
            dir.join("enabled").display()
        )),
        None => problems.push(format!(
            "no mode selected in {} ({:?}): echo madvise > it",
            dir.join("enabled").display(),
            enabled_text.trim()
        )),
    }
    let shmem = shmem_enabled.and_then(thp_mode);
    match shmem {
        Some("never") | Some("deny") => problems.push(format!(
            "shmem_enabled is {}, so guest RAM (shared memory) gets 4 KiB pages and boots \
             slower: echo advise > {}",
            shmem.unwrap_or_default(),
            dir.join("shmem_enabled").display()
        )),
        Some(_) => {}
        None => problems.push(format!(
            "{} cannot be read, so guest RAM (shared memory) may not get huge pages: use a \
             kernel with CONFIG_TRANSPARENT_HUGEPAGE and shmem_enabled set to advise",
            dir.join("shmem_enabled").display()
        )),
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(format!(
        "enabled={}, shmem_enabled={}",
        enabled.unwrap_or_default(),
        shmem.unwrap_or_default()
    ))
}

/// The file a fix should be made in: the config's, or the default path.
fn config_file(config: &Config) -> String {
    if config.path == Path::new(BUILT_IN) {
        format!("{DEFAULT_PATH} (from configs/isola.toml)")
    } else {
        config.path.display().to_string()
    }
}

/// That `path` is an executable file; else what to do, with `install` the
/// way to get it and `key` the config key naming it.
fn executable(path: &Path, key: &str, install: &str, config: &Config) -> Result<(), String> {
    let elsewhere = format!("or set {key} in {}", config_file(config));
    match std::fs::metadata(path) {
        Err(err) if err.kind() == ErrorKind::NotFound => Err(format!(
            "{} does not exist: {install}, {elsewhere}",
            path.display()
        )),
        Err(err) => Err(format!("{}: {err}", path.display())),
        Ok(meta) if !meta.is_file() => Err(format!(
            "{} is not a file: {install}, {elsewhere}",
            path.display()
        )),
        Ok(_) => nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).map_err(|err| {
            format!(
                "{} is not executable by this user ({err}): chmod +x it",
                path.display()
            )
        }),
    }
}

/// Runs `cmd` with no stdin, for at most `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| err.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|err| err.to_string()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                // Already exiting or not, it is abandoned either way.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {} s", timeout.as_secs()));
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// The first line `program args` prints (stdout, else stderr), if it
/// succeeds.
fn first_line(program: &Path, args: &[&str]) -> Result<String, String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let out = output_within(Command::new(program).args(args), COMMAND_TIMEOUT)
        .map_err(|err| format!("`{shown}`: {err}"))?;
    let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    match (out.status.success(), line) {
        (true, Some(line)) => Ok(line.to_string()),
        (true, None) => Err(format!("`{shown}` printed nothing")),
        (false, line) => Err(format!(
            "`{shown}` failed ({}){}",
            out.status,
            line.map(|l| format!(": {l}")).unwrap_or_default()
        )),
    }
}

/// The version in a `--version` line: its first word that starts with a
/// digit (`isola-vmm 0.1.0` → `0.1.0`; a leading `v` is dropped).
pub fn version_in(line: &str) -> Option<&str> {
    line.split_whitespace()
        .map(|w| w.strip_prefix('v').unwrap_or(w))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
}

/// Check 5a: isola-vmm is there and runs; its detail and version.
fn isola_vmm(config: &Config) -> Result<(String, Option<String>), String> {
    let vmm = &config.hypervisor.vmm;
    executable(
        vmm,
        "hypervisor.vmm",
        "install it (`make` builds target/release/isola-vmm)",
        config,
    )?;
    let line = first_line(vmm, &["--version"])?;
    let version = version_in(&line).map(str::to_string);
    Ok((format!("{} ({line})", vmm.display()), version))
}

/// Whether isola-vmm's jail works here: `isola-vmm --check-jail` as a
/// user of the configured range (taken for the check), on an empty
/// directory of its own.
fn jail(config: &Config) -> Result<String, String> {
    let Some(uids) = config.jail.uids() else {
        return Ok(format!(
            "off (jail.enabled = false in {}): isola-vmm runs as root, unconfined",
            config_file(config)
        ));
    };
    let lease = isola_sandbox::jail::UidLease::acquire(&uids, "isola check")
        .map_err(|err| format!("no uid for the jail: {err}"))?;
    let root = std::env::temp_dir().join(format!("isola-check-jail-{}", std::process::id()));
    isola_sandbox::share::create_private_dir(&root)
        .map_err(|err| format!("creating {}: {err}", root.display()))?;
    let out = output_within(
        Command::new(&config.hypervisor.vmm)
            .arg("--check-jail")
            .arg("--jail")
            .arg(format!(
                "uid={0},gid={0},root={1}",
                lease.uid(),
                root.display()
            )),
        COMMAND_TIMEOUT,
    );
    let _ = std::fs::remove_dir(&root);
    let out = out?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
    if out.status.success() {
        let report = text(&out.stdout);
        Ok(report.strip_prefix("jail: ").unwrap_or(&report).to_string())
    } else {
        Err(format!(
            "{} (isola runs VMMs unjailed only with jail.enabled = false in {})",
            text(&out.stderr),
            config_file(config)
        ))
    }
}

/// What a guest kernel image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An x86-64 ELF `vmlinux`.
    Vmlinux,
    /// A bzImage (the boot protocol's `HdrS` header).
    BzImage,
}

/// What `head` (the first 1 KiB or more of a file) says the kernel is, or
/// what is wrong with it.
pub fn kernel_kind(head: &[u8]) -> Result<KernelKind, String> {
    if head.starts_with(b"\x7fELF") {
        // e_ident[EI_CLASS] = ELFCLASS64, e_ident[EI_DATA] = little endian,
        // e_machine = EM_X86_64.
        let machine = head.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if head.get(4) == Some(&2) && head.get(5) == Some(&1) && machine == Some(0x3e) {
            return Ok(KernelKind::Vmlinux);
        }
        return Err("is an ELF file but not an x86-64 one".to_string());
    }
    if head.get(0x1fe..0x200) == Some(&[0x55, 0xaa][..]) && head.get(0x202..0x206) == Some(b"HdrS")
    {
        return Ok(KernelKind::BzImage);
    }
    Err("is neither an ELF vmlinux nor a bzImage".to_string())
}

/// The kernel's version string (`6.1.192`), from `Linux version X` inside
/// a vmlinux or the bzImage header's `kernel_version` pointer.
pub fn kernel_version(image: &[u8], kind: KernelKind) -> Option<String> {
    let text = match kind {
        KernelKind::Vmlinux => {
            let start = find(image, b"Linux version ")? + b"Linux version ".len();
            image.get(start..)?
        }
        KernelKind::BzImage => {
            let ptr = image.get(0x20e..0x210)?;
            let offset = usize::from(u16::from_le_bytes([ptr[0], ptr[1]])) + 0x200;
            image.get(offset..)?
        }
    };
    let end = text
        .iter()
        .position(|b| *b == 0 || b.is_ascii_whitespace())
        .unwrap_or(text.len())
        .min(64);
    let version = std::str::from_utf8(&text[..end]).ok()?;
    (!version.is_empty()).then(|| version.to_string())
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Check 5b: the guest kernel is a readable vmlinux or bzImage.
fn kernel(config: &Config) -> Result<String, String> {
    let path = &config.hypervisor.kernel;
    let image = std::fs::read(path).map_err(|err| {
        if err.kind() == ErrorKind::NotFound {
            format!(
                "{} does not exist: install the guest kernel (`make` builds build/vmlinux), or \
                 set hypervisor.kernel in {}",
                path.display(),
                config_file(config)
            )
        } else {
            format!("reading {}: {err}", path.display())
        }
    })?;
    let kind = kernel_kind(&image).map_err(|problem| {
        format!(
            "{} {problem}: use build/vmlinux or build/bzImage (guest-kernel/build.sh)",
            path.display()
        )
    })?;
    let what = match kind {
        KernelKind::Vmlinux => "ELF vmlinux",
        KernelKind::BzImage => "bzImage",
    };
    Ok(match kernel_version(&image, kind) {
        Some(version) => format!("{} ({what}, Linux {version})", path.display()),
        None => format!("{} ({what})", path.display()),
    })
}

/// One entry of a newc cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// As stored (`init`, `dev/console`).
    pub name: String,
    pub mode: u32,
    /// Where its contents are in the archive.
    pub data: std::ops::Range<usize>,
}

/// The entries of a newc cpio archive (magic `070701`, or `070702` with
/// checksums), up to its trailer.
pub fn cpio_entries(archive: &[u8]) -> Result<Vec<CpioEntry>, String> {
    const HEADER: usize = 110;
    let hex = |at: usize, field: usize| -> Result<usize, String> {
        let start = at + 6 + field * 8;
        archive
            .get(start..start + 8)
            .and_then(|f| std::str::from_utf8(f).ok())
            .and_then(|f| usize::from_str_radix(f, 16).ok())
            .ok_or_else(|| format!("a bad cpio header at byte {at}"))
    };
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        match archive.get(at..at + 6) {
            Some(b"070701") | Some(b"070702") => {}
            _ if at == 0 => {
                return Err("is not a newc cpio archive (no magic 070701)".to_string());
            }
            _ => return Err(format!("has no cpio header at byte {at} (truncated?)")),
        }
        let mode = u32::try_from(hex(at, 1)?).map_err(|_| format!("a bad mode at byte {at}"))?;
        let size = hex(at, 6)?;
        let name_size = hex(at, 11)?;
        let name_start = at + HEADER;
        let name = archive
            .get(name_start..name_start + name_size.saturating_sub(1))
            .ok_or_else(|| format!("is truncated in the name at byte {name_start}"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = align(name_start + name_size);
        let data_end = data_start
            .checked_add(size)
            .filter(|end| *end <= archive.len())
            .ok_or_else(|| format!("is truncated in {name:?}"))?;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            data: data_start..data_end,
        });
        at = align(data_end);
    }
}

/// The agent version in a binary that prints `isola-agent ready:
/// version=X ...`.
pub fn agent_version(binary: &[u8]) -> Option<String> {
    let start = find(binary, AGENT_MARKER)? + AGENT_MARKER.len();
    let rest = binary.get(start..)?;
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || b".-+~_".contains(b)))
        .unwrap_or(rest.len());
    let version = std::str::from_utf8(&rest[..end]).ok()?;
    (!version.is_empty()).then(|| version.to_string())
}

/// Check 5c: the initrd is a newc cpio (plain or gzip) whose `/init` is
/// isola-agent; its detail and the agent's version.
fn initrd(config: &Config) -> Result<(String, String), String> {
    let path = &config.hypervisor.initrd;
    let rebuild = "rebuild it with `make initrd` (rootfs-builder)";
    let raw = std::fs::read(path).map_err(|err| {
        if err.kind() == ErrorKind::NotFound {
            format!(
                "{} does not exist: install the guest initrd (`make` builds build/initrd.img), \
                 or set hypervisor.initrd in {}",
                path.display(),
                config_file(config)
            )
        } else {
            format!("reading {}: {err}", path.display())
        }
    })?;
    let (archive, compression) = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_INITRD_BYTES)
            .read_to_end(&mut out)
            .map_err(|err| format!("{} is gzip but does not unpack: {err}", path.display()))?;
        (out, "gzip ")
    } else {
        (raw, "")
    };
    let entries =
        cpio_entries(&archive).map_err(|p| format!("{} {p}: {rebuild}", path.display()))?;
    let init = entries
        .iter()
        .find(|e| matches!(e.name.as_str(), "init" | "./init" | "/init"))
        .ok_or_else(|| format!("{} has no /init: {rebuild}", path.display()))?;
    if init.mode & 0o170000 != 0o100000 || init.mode & 0o111 == 0 {
        return Err(format!(
            "{}: /init is not an executable file (mode {:o}): {rebuild}",
            path.display(),
            init.mode
        ));
    }
    let version = archive
        .get(init.data.clone())
        .and_then(agent_version)
        .ok_or_else(|| {
            format!(
                "{}: /init is not isola-agent (no `isola-agent ready: version=` in it): \
                 {rebuild}",
                path.display()
            )
        })?;
    Ok((
        format!(
            "{} ({compression}newc cpio, {} entries, /init is isola-agent {version})",
            path.display(),
            entries.len()
        ),
        version,
    ))
}

/// Check 5d: isola-vmm and the initrd's agent come from the same build
/// (the workspace version). The guest kernel carries no isola version: it
/// is only checked to be a kernel.
pub fn versions(vmm: Option<&str>, agent: Option<&str>) -> Result<String, String> {
    match (vmm, agent) {
        (Some(vmm), Some(agent)) if vmm == agent => Ok(format!(
            "isola-vmm and the initrd's isola-agent are both {vmm}"
        )),
        (Some(vmm), Some(agent)) => Err(format!(
            "isola-vmm is {vmm} but the initrd's isola-agent is {agent}: install isola-vmm and \
             the initrd from one build (`make`)"
        )),
        (vmm, agent) => Err(format!(
            "cannot compare: the version of {} is unknown (see above)",
            match (vmm, agent) {
                (None, None) => "isola-vmm and of the initrd's isola-agent",
                (None, _) => "isola-vmm",
                _ => "the initrd's isola-agent",
            }
        )),
    }
}

/// Check 6: virtiofsd is there, runs, and its version.
fn virtiofsd(config: &Config) -> Result<String, String> {
    let path = &config.virtiofs.virtiofsd;
    executable(
        path,
        "virtiofs.virtiofsd",
        "install the Rust virtiofsd there (`make virtiofsd` puts one in \
         ~/.cache/isola/tools/bin)",
        config,
    )?;
    let line = first_line(path, &["--version"])?;
    Ok(format!("{} ({line})", path.display()))
}

/// The server version in `ctr version`'s output.
pub fn ctr_server_version(output: &str) -> Option<String> {
    let mut lines = output.lines().skip_while(|l| l.trim() != "Server:");
    lines.next()?;
    lines
        .map_while(|l| l.starts_with(char::is_whitespace).then_some(l.trim()))
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The first executable file of `candidates`.
fn first_executable(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates
        .iter()
        .find(|p| {
            p.is_file() && nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok()
        })
        .cloned()
}

/// That something accepts connections on containerd's socket.
fn containerd_reachable(address: &Path) -> Result<(), String> {
    let start = "start containerd (systemctl start containerd), or pass --containerd-address";
    match UnixStream::connect(address) {
        Ok(_) => Ok(()),
        Err(err) => Err(match err.kind() {
            ErrorKind::NotFound => format!("no socket at {}: {start}", address.display()),
            ErrorKind::ConnectionRefused => {
                format!("nothing listens on {}: {start}", address.display())
            }
            ErrorKind::PermissionDenied => format!(
                "{} is not accessible by this user ({err}): run as root",
                address.display()
            ),
            _ => format!("connecting to {}: {err}: {start}", address.display()),
        }),
    }
}

/// Check 7: containerd answers on its socket; its version.
fn containerd(address: &Path) -> Result<String, String> {
    containerd_reachable(address)?;
    let address_text = address.display().to_string();
    let version = if let Some(ctr) = first_executable(&host::on_path("ctr")) {
        output_within(
            Command::new(ctr).args(["--address", &address_text, "version"]),
            COMMAND_TIMEOUT,
        )
        .ok()
        .and_then(|out| ctr_server_version(&String::from_utf8_lossy(&out.stdout)))
        .map(|v| format!("containerd {v}"))
    } else {
        None
    };
    let version = version.or_else(|| {
        let containerd = first_executable(&host::on_path("containerd"))?;
        first_line(&containerd, &["--version"]).ok()
    });
    Ok(format!(
        "{address_text} answers ({})",
        version.unwrap_or_else(|| "version unknown: neither `ctr version` nor \
                                   `containerd --version` told"
            .to_string())
    ))
}

/// Check 8: the shim is on PATH (`candidates`: its name in every PATH
/// directory).
fn shim(candidates: &[PathBuf]) -> Result<String, String> {
    match first_executable(candidates) {
        Some(path) => Ok(path.display().to_string()),
        None => Err(format!(
            "{SHIM} is not on PATH: build it (cargo build --release -p isola-shim) and install \
             target/release/{SHIM} in /usr/local/bin, on containerd's PATH too"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_start_with_ok_or_fail() {
        let ok = Check::new("kvm", Ok("fine".to_string()));
        assert_eq!(ok.line(), "ok   kvm: fine");
        assert_eq!(Check::new("x", Ok(String::new())).line(), "ok   x");
        let fail = Check::new("kvm", Err("broken: fix it".to_string()));
        assert_eq!(fail.line(), "FAIL kvm: broken: fix it");
        assert!(ok.passed() && !fail.passed());
    }

    #[test]
    fn the_debug_shell_must_be_static_when_sessions_are_on() {
        let mut config = Config::defaults();
        assert!(debug_shell(&config).expect("off").contains("off"));
        config.debug.console = true;
        config.debug.busybox = std::env::current_exe().expect("exe");
        let err = debug_shell(&config).expect_err("dynamic");
        assert!(err.contains("not a static"), "{err}");
        config.debug.busybox = "/nonexistent/busybox".into();
        assert!(debug_shell(&config).is_err());
    }

    #[test]
    fn cpu_flags_and_pvm_are_told() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sys = tmp.path();
        let vmx = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let svm = "flags : fpu svm sse\n";
        let err = kvm_kind("flags : fpu sse\nvmx flags : vnmi\n", sys).expect_err("no flag");
        assert!(err.contains("neither vmx nor svm"), "{err}");
        let err = kvm_kind(vmx, sys).expect_err("no module");
        assert!(err.contains("modprobe kvm_intel"), "{err}");
        std::fs::create_dir(sys.join("kvm_intel")).expect("mkdir");
        assert!(kvm_kind(vmx, sys).is_ok_and(|d| d.contains("vmx")));
        let err = kvm_kind(svm, sys).expect_err("no kvm_amd");
        assert!(err.contains("modprobe kvm_amd"), "{err}");
        std::fs::create_dir(sys.join("kvm_pvm")).expect("mkdir");
        let err = kvm_kind(vmx, sys).expect_err("pvm");
        assert!(
            err.contains("PVM") && err.contains("modprobe -r kvm_pvm"),
            "{err}"
        );
        let err = kvm_kind("flags : fpu\n", sys).expect_err("pvm, no flag");
        assert!(
            err.contains("neither vmx nor svm (/dev/kvm is PVM"),
            "{err}"
        );
    }

    #[test]
    fn devices_that_are_missing_or_not_kvm_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("kvm");
        let err = kvm_device(&missing).expect_err("missing");
        assert!(
            err.contains("does not exist") && err.contains("modprobe"),
            "{err}"
        );
        let err = tun_device(&missing).expect_err("missing");
        assert!(err.contains("modprobe tun"), "{err}");
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, b"").expect("write");
        let err = kvm_device(&plain).expect_err("not kvm");
        assert!(err.contains("is not a KVM device"), "{err}");
    }

    #[test]
    fn thp_modes_are_read() {
        assert_eq!(thp_mode("always [madvise] never\n"), Some("madvise"));
        assert_eq!(thp_mode("[always] madvise never"), Some("always"));
        assert_eq!(
            thp_mode("always within_size advise [never] deny force"),
            Some("never")
        );
        assert_eq!(thp_mode("always madvise never"), None);
        assert_eq!(thp_mode(""), None);

        let dir = Path::new("/sys/kernel/mm/transparent_hugepage");
        let good = thp_verdict(
            dir,
            Some("always [madvise] never"),
            Some("always within_size [advise] never deny force"),
        );
        assert_eq!(
            good,
            Ok("enabled=madvise, shmem_enabled=advise".to_string())
        );
        let err = thp_verdict(dir, Some("always madvise [never]"), Some("[advise] never"))
            .expect_err("never");
        assert!(
            err.contains("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled"),
            "{err}"
        );
        let err = thp_verdict(dir, Some("[always] never"), Some("advise [never] deny"))
            .expect_err("shmem never");
        assert!(
            err.contains("echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled")
                && !err.contains("echo madvise"),
            "{err}"
        );
        let err = thp_verdict(dir, None, None).expect_err("no THP");
        assert!(err.contains("CONFIG_TRANSPARENT_HUGEPAGE"), "{err}");
    }

    /// A newc entry as rootfs-builder writes one.
    fn newc(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }

    #[test]
    fn cpio_archives_are_read() {
        let agent = b"\x7fELF...isola-agent ready: version=0.1.0 uptime_ms={}";
        let mut archive = Vec::new();
        newc(&mut archive, "dev", 0o40755, b"");
        newc(&mut archive, "init", 0o100755, agent);
        newc(&mut archive, "TRAILER!!!", 0, b"");
        let entries = cpio_entries(&archive).expect("valid");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].name, "init");
        assert_eq!(entries[1].mode, 0o100755);
        assert_eq!(&archive[entries[1].data.clone()], agent);
        assert_eq!(
            agent_version(&archive[entries[1].data.clone()]),
            Some("0.1.0".to_string())
        );
        assert_eq!(agent_version(b"isola-agent ready: version={}"), None);
        assert_eq!(agent_version(b"busybox"), None);

        let err = cpio_entries(b"\x1f\x8b\x08\x00").expect_err("gzip");
        assert!(err.contains("magic 070701"), "{err}");
        let err = cpio_entries(b"070707").expect_err("odc");
        assert!(err.contains("magic 070701"), "{err}");
        let err = cpio_entries(&archive[..archive.len() - 20]).expect_err("truncated");
        assert!(err.contains("truncated") || err.contains("header"), "{err}");
    }

    #[test]
    fn kernels_are_recognised() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 0x3e;
        elf.extend_from_slice(b"...Linux version 6.1.192 (root@vm) #1\0");
        assert_eq!(kernel_kind(&elf), Ok(KernelKind::Vmlinux));
        assert_eq!(
            kernel_version(&elf, KernelKind::Vmlinux),
            Some("6.1.192".to_string())
        );
        elf[18] = 0xb7; // aarch64
        assert!(kernel_kind(&elf).is_err());

        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        bz[0x300..0x30a].copy_from_slice(b"6.12.9 (x)");
        assert_eq!(kernel_kind(&bz), Ok(KernelKind::BzImage));
        assert_eq!(
            kernel_version(&bz, KernelKind::BzImage),
            Some("6.12.9".to_string())
        );
        let err = kernel_kind(b"070701").expect_err("not a kernel");
        assert!(err.contains("neither"), "{err}");
    }

    #[test]
    fn versions_are_compared() {
        assert_eq!(version_in("isola-vmm 0.1.0"), Some("0.1.0"));
        assert_eq!(version_in("virtiofsd v1.14.0"), Some("1.14.0"));
        assert_eq!(version_in("isola-vmm"), None);
        assert!(versions(Some("0.1.0"), Some("0.1.0")).is_ok());
        let err = versions(Some("0.1.0"), Some("0.2.0")).expect_err("mismatch");
        assert!(err.contains("0.1.0") && err.contains("0.2.0"), "{err}");
        let err = versions(None, Some("0.1.0")).expect_err("unknown");
        assert!(err.contains("isola-vmm is unknown"), "{err}");
    }

    #[test]
    fn ctr_version_output_is_read() {
        let out = "Client:\n  Version:  1.6.20~ds1\n  Revision: 1.6.20~ds1-1+b1\n  Go version: \
                   go1.19.8\n\nServer:\n  Version:  v1.7.24\n  Revision: 88bf19b2\n  UUID: x\n";
        assert_eq!(ctr_server_version(out), Some("v1.7.24".to_string()));
        assert_eq!(
            ctr_server_version("Client:\n  Version:  1.6.20\n"),
            None,
            "a client-only output has no server version"
        );
    }

    #[test]
    fn a_missing_containerd_and_shim_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("containerd.sock");
        let err = containerd(&sock).expect_err("no socket");
        assert!(err.contains("systemctl start containerd"), "{err}");
        let err = shim(&[tmp.path().join(SHIM)]).expect_err("no shim");
        assert!(err.contains("is not on PATH"), "{err}");
        // Something listening is reachable (not `containerd`: that would
        // ask `ctr` for the version of a server that is not one).
        let _listening = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert_eq!(containerd_reachable(&sock), Ok(()));
    }
}
