//! What `isola run` needs from the host: a KVM that boots standard guests,
//! and the kernel, initrd, isola-vmm and virtiofsd to use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Why this host's `/dev/kvm` cannot run isola's guests, if it cannot
/// (the checks of tests/kvm-host/run's `native_reason`).
pub fn kvm_problem(dev: &Path, sys_module: &Path, cpuinfo: &str) -> Option<String> {
    if !dev.exists() {
        return Some(format!(
            "{} does not exist: this host has no KVM (enable hardware virtualization, or nested \
             virtualization in a VM)",
            dev.display()
        ));
    }
    if let Err(err) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Some(format!(
            "{} is not accessible: {err} (run as root, or as a member of its group)",
            dev.display()
        ));
    }
    if is_pvm(sys_module) {
        return Some(format!(
            "{} is PVM (kvm_pvm), which boots only PVM guest kernels, not isola's",
            dev.display()
        ));
    }
    if cpu_virt_flag(cpuinfo).is_none() {
        return Some(format!(
            "{} exists but the CPU shows neither vmx nor svm",
            dev.display()
        ));
    }
    None
}

/// The hardware virtualization flag of `/proc/cpuinfo`'s `flags` lines:
/// `vmx` (Intel VT-x) or `svm` (AMD-V), if the CPU shows one.
pub fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|f| match f {
            "vmx" => Some("vmx"),
            "svm" => Some("svm"),
            _ => None,
        })
}

/// Whether `/dev/kvm` is PVM's (the module `kvm_pvm` is loaded, under
/// `sys_module`, normally `/sys/module`).
pub fn is_pvm(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// Checks this host's KVM.
pub fn check_kvm() -> Result<()> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match kvm_problem(Path::new("/dev/kvm"), Path::new("/sys/module"), &cpuinfo) {
        Some(problem) => bail!("cannot run microVMs here: {problem}"),
        None => Ok(()),
    }
}

/// Where to look for one of the files `isola run` needs.
#[derive(Debug)]
pub struct Lookup<'a> {
    /// What it is, for messages ("guest kernel").
    pub what: &'a str,
    pub flag: Option<PathBuf>,
    /// The environment variable that names it.
    pub env: &'a str,
    /// Candidates after the flag and the variable, in order.
    pub candidates: Vec<PathBuf>,
}

impl Lookup<'_> {
    /// The flag, else the variable (each must exist if given), else the
    /// first candidate that exists; the error names every place tried.
    pub fn find(&self, env_value: Option<PathBuf>) -> Result<PathBuf> {
        if let Some(path) = &self.flag {
            if !path.is_file() {
                bail!("the {} {} does not exist", self.what, path.display());
            }
            return Ok(path.clone());
        }
        if let Some(path) = env_value {
            if !path.is_file() {
                bail!(
                    "the {} {} (from {}) does not exist",
                    self.what,
                    path.display(),
                    self.env
                );
            }
            return Ok(path);
        }
        if let Some(found) = self.candidates.iter().find(|p| p.is_file()) {
            return Ok(found.clone());
        }
        bail!(
            "no {} found: set {} or pass its flag; looked for {}",
            self.what,
            self.env,
            self.candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Finds a file: `flag`, else the variable `env`, else the first of
/// `candidates` that exists.
pub fn locate(
    what: &str,
    flag: &Option<PathBuf>,
    env: &str,
    candidates: impl FnOnce() -> Vec<PathBuf>,
) -> Result<PathBuf> {
    Lookup {
        what,
        flag: flag.clone(),
        env,
        candidates: candidates(),
    }
    .find(std::env::var_os(env).map(PathBuf::from))
}

/// This binary as it was run: `arg0` when it names a file by a path (it
/// has a slash), made absolute against `cwd`; a bare name, the first file
/// of that name in `path` (as execvp found it); else `exe` (the running
/// executable, links resolved). A build output is found as
/// `<checkout>/target/<profile>/isola`, whose `target` may link to cargo's
/// build directory in the cache (`isola_cargo_target`, scripts/lib.sh),
/// shared by every checkout of the machine: only the path it was run by
/// names the checkout, and so its `build/`.
pub fn run_as(
    arg0: Option<&std::ffi::OsStr>,
    cwd: &Path,
    path: Option<&std::ffi::OsStr>,
    exe: PathBuf,
) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let named = match arg0 {
        Some(arg0) if arg0.as_bytes().contains(&b'/') => Some(cwd.join(arg0)),
        Some(arg0) if !arg0.is_empty() => path.and_then(|path| {
            in_path(path, arg0)
                .into_iter()
                .map(|file| cwd.join(file))
                .find(|file| file.is_file())
        }),
        _ => None,
    };
    named.filter(|file| file.is_file()).unwrap_or(exe)
}

/// The project's `build/` when this binary is a build output
/// (`<project>/target/<profile>/isola`).
pub fn project_build_dir(exe: &Path) -> Option<PathBuf> {
    let profile_dir = exe.parent()?;
    let target = profile_dir.parent()?;
    (target.file_name()? == "target").then(|| target.parent().map(|p| p.join("build")))?
}

/// Where installed files live.
pub const SHARE_DIR: &str = "/usr/local/share/isola";

/// The candidates for a guest image (`vmlinux`, `initrd.img`): the
/// `build/` of the checkout each of `exes` is a build output of, in turn,
/// then the installed one.
pub fn image_candidates(exes: &[&Path], name: &str) -> Vec<PathBuf> {
    let mut list = Vec::new();
    for build in exes.iter().filter_map(|exe| project_build_dir(exe)) {
        let file = build.join(name);
        if !list.contains(&file) {
            list.push(file);
        }
    }
    list.push(Path::new(SHARE_DIR).join(name));
    list
}

/// The candidates for isola-vmm: beside this binary, then on PATH.
pub fn vmm_candidates(exe: &Path) -> Vec<PathBuf> {
    let mut list = Vec::new();
    if let Some(dir) = exe.parent() {
        list.push(dir.join("isola-vmm"));
    }
    list.extend(on_path("isola-vmm"));
    list
}

/// The candidates for virtiofsd: the Rust one `make` installs in the
/// cache, Debian's package's, then PATH.
pub fn virtiofsd_candidates() -> Vec<PathBuf> {
    let mut list = Vec::new();
    let cache = std::env::var_os("ISOLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/isola")));
    if let Some(cache) = cache {
        list.push(cache.join("tools/bin/virtiofsd"));
    }
    list.push(PathBuf::from("/usr/libexec/virtiofsd"));
    list.extend(on_path("virtiofsd"));
    list
}

/// `name` in every directory of `PATH`, in order (existing or not).
pub fn on_path(name: &str) -> Vec<PathBuf> {
    in_path(&std::env::var_os("PATH").unwrap_or_default(), name)
}

/// `name` in each directory of the search path `path`, in order.
fn in_path(path: &std::ffi::OsStr, name: impl AsRef<Path>) -> Vec<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_problems_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dev = tmp.path().join("kvm");
        let sys = tmp.path().join("module");
        std::fs::create_dir_all(&sys).expect("mkdir");
        let vmx = "flags\t\t: fpu vme vmx sse\n";
        let p = kvm_problem(&dev, &sys, vmx).unwrap_or_default();
        assert!(p.contains("does not exist"), "{p}");
        std::fs::write(&dev, b"").expect("fake device");
        assert_eq!(kvm_problem(&dev, &sys, vmx), None);
        assert_eq!(kvm_problem(&dev, &sys, "flags : fpu svm\n"), None);
        let p = kvm_problem(&dev, &sys, "flags : fpu sse\n").unwrap_or_default();
        assert!(p.contains("neither vmx nor svm"), "{p}");
        std::fs::create_dir_all(sys.join("kvm_pvm")).expect("mkdir");
        let p = kvm_problem(&dev, &sys, vmx).unwrap_or_default();
        assert!(p.contains("PVM"), "{p}");
    }

    #[test]
    fn lookups_prefer_flag_then_env_then_candidates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::write(&b, b"").expect("write");
        let mut l = Lookup {
            what: "guest kernel",
            flag: None,
            env: "ISOLA_KERNEL",
            candidates: vec![a.clone(), b.clone()],
        };
        assert_eq!(l.find(None).ok(), Some(b.clone()));
        let err = l
            .find(Some(a.clone()))
            .expect_err("env names a missing file");
        assert!(err.to_string().contains("(from ISOLA_KERNEL)"), "{err}");
        l.flag = Some(a.clone());
        let err = l
            .find(Some(b.clone()))
            .expect_err("flag names a missing file");
        assert!(err.to_string().contains("guest kernel"), "{err}");
        l.flag = None;
        l.candidates = vec![a.clone()];
        let err = l.find(None).expect_err("nothing");
        let text = err.to_string();
        assert!(
            text.contains("set ISOLA_KERNEL") && text.contains(&a.display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn the_binary_is_named_by_the_path_it_was_run_by() {
        use std::ffi::OsStr;
        let dir = tempfile::tempdir().expect("tempdir");
        let release = dir.path().join("co/target/release");
        std::fs::create_dir_all(&release).expect("mkdir");
        std::fs::write(release.join("isola"), b"").expect("write");
        let exe = PathBuf::from("/cache/cargo-target/release/isola");
        let by_path = release.join("isola");
        // By a path, absolute or relative to the working directory: that
        // path, links in it kept.
        assert_eq!(
            run_as(Some(by_path.as_os_str()), Path::new("/"), None, exe.clone()),
            by_path
        );
        let co = dir.path().join("co");
        let arg0 = OsStr::new("target/release/isola");
        assert_eq!(run_as(Some(arg0), &co, None, exe.clone()), by_path);
        // By name: the first of PATH's directories that has it.
        let path = std::env::join_paths([dir.path().join("empty"), release.clone()]).expect("PATH");
        let isola = Some(OsStr::new("isola"));
        assert_eq!(run_as(isola, &co, Some(&path), exe.clone()), by_path);
        // A name PATH does not have, a path that names no file, nothing: the
        // running executable.
        assert_eq!(
            run_as(Some(OsStr::new("isola-x")), &co, Some(&path), exe.clone()),
            exe
        );
        let nowhere = OsStr::new("/nowhere/target/release/isola");
        assert_eq!(run_as(Some(nowhere), &co, Some(&path), exe.clone()), exe);
        assert_eq!(run_as(isola, &co, None, exe.clone()), exe);
        assert_eq!(run_as(None, &co, Some(&path), exe.clone()), exe);
    }

    #[test]
    fn build_outputs_are_found_next_to_the_binary() {
        assert_eq!(
            project_build_dir(Path::new("/src/isola/target/release/isola")),
            Some(PathBuf::from("/src/isola/build"))
        );
        assert_eq!(project_build_dir(Path::new("/usr/local/bin/isola")), None);
        assert_eq!(
            image_candidates(&[Path::new("/p/target/debug/isola")], "vmlinux"),
            [
                PathBuf::from("/p/build/vmlinux"),
                PathBuf::from("/usr/local/share/isola/vmlinux")
            ]
        );
        // As run (a checkout's link) and as resolved (the cache): each
        // build/ once, then the installed one.
        let ran = Path::new("/p/target/release/isola");
        let real = Path::new("/cache/target/release/isola");
        assert_eq!(
            image_candidates(&[ran, real, ran], "initrd.img"),
            [
                PathBuf::from("/p/build/initrd.img"),
                PathBuf::from("/cache/build/initrd.img"),
                PathBuf::from("/usr/local/share/isola/initrd.img")
            ]
        );
    }
}
