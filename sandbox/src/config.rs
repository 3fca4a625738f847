//! isola's runtime configuration: a TOML file, installed as
//! `/etc/isola/config.toml` (`configs/isola.toml` in the source tree is
//! every key with its default).
//!
//! ```toml
//! [hypervisor]      # isola-vmm, the guest images, the VM's size
//! [virtiofs]        # virtiofsd
//! [runtime]         # logs, run directories, timeouts
//! ```
//!
//! Every key is optional ([`Config::defaults`]); an unknown key, a value of
//! the wrong type or out of range is an error naming the file and the key
//! (`hypervisor.default_vcpus`). A pod may override the hypervisor settings
//! the file lists in `hypervisor.enable_annotations`, through annotations
//! `io.isola.config.<name>` ([`Config::with_annotations`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The longest start or stop timeout a config may ask for (an hour).
pub const MAX_TIMEOUT_SECS: u64 = 3600;

/// Where the configuration is installed.
pub const DEFAULT_PATH: &str = "/etc/isola/config.toml";
/// The environment variable naming another configuration file.
pub const ENV_VAR: &str = "ISOLA_CONFIG";
/// Pod annotations `io.isola.config.<name>` override hypervisor settings.
pub const ANNOTATION_PREFIX: &str = "io.isola.config.";
/// [`Config::path`] when no file was read.
pub const BUILT_IN: &str = "(built-in defaults)";

/// The hypervisor settings an annotation may override, when
/// `hypervisor.enable_annotations` lists them.
pub const ANNOTATABLE: [&str; 4] = [
    "default_vcpus",
    "default_memory_mib",
    "kernel_params",
    "net_offloads",
];
/// virtiofsd's `--cache` modes.
pub const CACHE_MODES: [&str; 4] = ["never", "metadata", "auto", "always"];
/// The agent's and virtiofsd's log levels.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// The most vCPUs isola-vmm boots (its MP table must fit the 1 KiB EBDA).
pub const VMM_MAX_VCPUS: u32 = 32;
/// Memory bounds of isola-vmm in MiB: below the minimum a guest kernel
/// does not boot.
pub const VMM_MIN_MEMORY_MIB: u32 = 64;
pub const VMM_MAX_MEMORY_MIB: u32 = 1 << 20;

/// isola's runtime configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, or [`BUILT_IN`].
    pub path: PathBuf,
    pub hypervisor: Hypervisor,
    pub virtiofs: Virtiofs,
    pub runtime: Runtime,
    pub jail: Jail,
    pub debug: Debug,
}

/// `[debug]`: an operator's way into the guests (`isola debug`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Debug {
    /// Debug sessions (`isola debug`): a shell in a guest's own
    /// namespaces, outside its containers. Read when a sandbox starts; no
    /// pod annotation can set it.
    pub console: bool,
    /// The static busybox the sessions run, served read-only in the
    /// share of each sandbox started while `console` is on.
    pub busybox: PathBuf,
}

impl Default for Debug {
    fn default() -> Self {
        Debug {
            console: false,
            busybox: PathBuf::from("/bin/busybox"),
        }
    }
}

/// `[jail]`: how isola-vmm is confined ([`crate::jail`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jail {
    /// Each isola-vmm runs jailed: its own namespaces, an empty read-only
    /// root, no capabilities, a user of its own from the range below.
    pub enabled: bool,
    /// The first uid (and gid) of the range jailed VMMs run as.
    pub first_uid: u32,
    /// How many: one per running sandbox.
    pub uid_count: u32,
    /// Where the uids in use are recorded (a lock file each), host-wide.
    pub lease_dir: PathBuf,
}

impl Default for Jail {
    fn default() -> Self {
        let uids = crate::jail::JailUids::default();
        Jail {
            enabled: true,
            first_uid: uids.first,
            uid_count: uids.count,
            lease_dir: uids.lease_dir,
        }
    }
}

impl Jail {
    /// The range, when the jail is on.
    pub fn uids(&self) -> Option<crate::jail::JailUids> {
        self.enabled.then(|| crate::jail::JailUids {
            first: self.first_uid,
            count: self.uid_count,
            lease_dir: self.lease_dir.clone(),
        })
    }
}

/// `[hypervisor]`: isola-vmm, the guest images and the VM's size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hypervisor {
    /// The isola-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel (`vmlinux` or bzImage).
    pub kernel: PathBuf,
    /// The guest initrd (its `/init` is isola-agent).
    pub initrd: PathBuf,
    /// vCPUs of a VM, 1..=`max_vcpus`.
    pub default_vcpus: u32,
    /// Memory of a VM in MiB, 64..=`max_memory_mib`.
    pub default_memory_mib: u32,
    /// The most vCPUs a VM may get (at most [`VMM_MAX_VCPUS`]).
    pub max_vcpus: u32,
    /// The most memory a VM may get, in MiB.
    pub max_memory_mib: u32,
    /// Appended to the guest kernel's command line.
    pub kernel_params: String,
    /// Checksum and TSO offloads offered on the pod's virtio-net devices.
    pub net_offloads: bool,
    /// A VM without a pod network (a spec whose network namespace has no
    /// path: Docker, `ctr run`) boots with a virtio-net device for the
    /// network Docker makes after Create ([`crate::network::LateTap`]).
    pub late_network: bool,
    /// Which of [`ANNOTATABLE`] a pod's annotations may override.
    pub enable_annotations: Vec<String>,
}

/// `[virtiofs]`: virtiofsd, which serves each sandbox's share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Virtiofs {
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// virtiofsd's `--cache`: never, metadata, auto or always.
    pub cache: String,
}

/// `[runtime]`: logs, run directories and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runtime {
    /// The agent's and virtiofsd's log level: error, warn, info, debug or
    /// trace.
    pub log_level: String,
    /// Sandbox directories are `<run_root>/<namespace>/<id>`
    /// ([`crate::share::sandbox_dir`]).
    pub run_root: PathBuf,
    /// Seconds a VM may take to boot and answer.
    pub start_timeout_secs: u64,
    /// Seconds a sandbox's stop waits for the guest and the VMM.
    pub stop_timeout_secs: u64,
    /// A sandbox whose host cgroup (its spec's `linux.cgroupsPath`) cannot
    /// be made fails to start; false: its VMM and virtiofsd run in the
    /// shim's cgroup, outside the pod's limits, with a warning.
    pub host_cgroup_required: bool,
    /// Start sandboxes from a template VM of their shape (booted once per
    /// node and shape, then cloned copy-on-write: [`crate::template`]);
    /// false: every sandbox boots, and clones share no memory.
    pub templates: bool,
    /// Keep each guest's serial console (kernel warnings and errors, the
    /// agent's warnings) in its sandbox's `console.log`
    /// ([`crate::Console::Kept`]); false: the VM has no serial device.
    pub guest_console: bool,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Hypervisor {
            vmm: PathBuf::from("/usr/local/bin/isola-vmm"),
            kernel: PathBuf::from("/usr/local/share/isola/vmlinux"),
            initrd: PathBuf::from("/usr/local/share/isola/initrd.img"),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 16,
            max_memory_mib: 16384,
            kernel_params: String::new(),
            net_offloads: true,
            late_network: true,
            enable_annotations: Vec::new(),
        }
    }
}

impl Default for Virtiofs {
    fn default() -> Self {
        Virtiofs {
            virtiofsd: PathBuf::from("/usr/local/libexec/isola/virtiofsd"),
            cache: "auto".to_string(),
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            log_level: "info".to_string(),
            run_root: PathBuf::from(crate::DEFAULT_RUN_ROOT),
            start_timeout_secs: 60,
            stop_timeout_secs: 10,
            host_cgroup_required: true,
            templates: true,
            guest_console: true,
        }
    }
}

/// The file's shape: three optional sections.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct File {
    hypervisor: Hypervisor,
    virtiofs: Virtiofs,
    runtime: Runtime,
    jail: Jail,
    debug: Debug,
}

/// A line and column in a file, from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` of `text`, if it is one.
    fn of(text: &str, offset: usize) -> Option<Location> {
        let before = text.get(..offset)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Some(Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// " (line L, column C)", or nothing.
fn at(location: &Option<Location>) -> String {
    location.map_or_else(String::new, |l| format!(" ({l})"))
}

/// What is wrong with a configuration file, or with annotations applied to
/// it. Every message names the file and the key (or the annotation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the isola config {}{origin}: {message}", .path.display())]
    Read {
        path: PathBuf,
        /// Where the path came from, e.g. " (from $ISOLA_CONFIG)"; may be
        /// empty.
        origin: String,
        message: String,
    },
    /// The file is not TOML.
    #[error("{}{}: not valid TOML: {message}", .path.display(), at(.location))]
    Syntax {
        path: PathBuf,
        location: Option<Location>,
        message: String,
    },
    /// A section or key that isola does not know (a typo?).
    #[error("unknown key `{key}` in {}{}: {expected}", .path.display(), at(.location))]
    UnknownKey {
        path: PathBuf,
        /// Dotted: `hypervisor.foo`.
        key: String,
        location: Option<Location>,
        /// The keys allowed there.
        expected: String,
    },
    /// A value of the wrong type.
    #[error("`{key}` in {}{}: {message}", .path.display(), at(.location))]
    Type {
        path: PathBuf,
        key: String,
        location: Option<Location>,
        message: String,
    },
    /// A value of the right type that isola cannot use.
    #[error("`{key}` in {}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// An `io.isola.config.*` annotation the file does not allow.
    #[error(
        "annotation `{annotation}` is not allowed: `{name}` is not in \
         hypervisor.enable_annotations of {}{hint}",
        .path.display()
    )]
    AnnotationNotEnabled {
        annotation: String,
        name: String,
        path: PathBuf,
        /// Which names could be enabled, when `name` is none of them.
        hint: String,
    },
    /// An allowed annotation with a value isola cannot use.
    #[error("annotation `{annotation}` has a bad value {value:?}: {message}")]
    AnnotationValue {
        annotation: String,
        value: String,
        message: String,
    },
}

impl Config {
    /// The file names of isola-vmm and virtiofsd: what a clean-up after a
    /// dead runner may kill (`child::kill_helpers`).
    pub fn helper_names(&self) -> Vec<String> {
        [&self.hypervisor.vmm, &self.virtiofs.virtiofsd]
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The built-in settings, used when `/etc/isola/config.toml` does not
    /// exist (and for every key a file leaves out): installed under
    /// `/usr/local`, 1 vCPU, 256 MiB (at most 16 and 16384), virtiofs
    /// cache `auto`, log level `info`, run root `/run/isola/sandboxes`,
    /// 60 s to start and 10 s to stop, no annotations.
    pub fn defaults() -> Config {
        Config {
            path: PathBuf::from(BUILT_IN),
            hypervisor: Hypervisor::default(),
            virtiofs: Virtiofs::default(),
            runtime: Runtime::default(),
            jail: Jail::default(),
            debug: Debug::default(),
        }
    }

    /// Parses and validates `text`, the contents of the file `path` (which
    /// errors name and [`Config::path`] records).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let syntax = |err: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            location: err.span().and_then(|s| Location::of(text, s.start)),
            message: err.message().to_string(),
        };
        let deserializer = toml::Deserializer::parse(text).map_err(syntax)?;
        let file: File = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            if key.is_empty() || key == "." {
                return syntax(inner);
            }
            let location = inner.span().and_then(|s| Location::of(text, s.start));
            let message = inner.message();
            match message.strip_prefix("unknown field `") {
                Some(rest) => ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    key,
                    location,
                    // "foo`, expected one of `a`, `b`"
                    expected: rest
                        .split_once("`, ")
                        .map_or("", |(_, expected)| expected)
                        .to_string(),
                },
                None => ConfigError::Type {
                    path: path.to_path_buf(),
                    key,
                    location,
                    message: message.to_string(),
                },
            }
        })?;
        let config = Config {
            path: path.to_path_buf(),
            hypervisor: file.hypervisor,
            virtiofs: file.virtiofs,
            runtime: file.runtime,
            jail: file.jail,
            debug: file.debug,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration: the `explicit` path, else the file named
    /// by `$ISOLA_CONFIG`, else [`DEFAULT_PATH`]. An explicit or `$ISOLA_CONFIG`
    /// file must exist; without [`DEFAULT_PATH`], [`Config::defaults`].
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_from(
            explicit,
            std::env::var_os(ENV_VAR).as_deref(),
            Path::new(DEFAULT_PATH),
        )
    }

    /// [`Config::load`] with the value of `$ISOLA_CONFIG` (`env`; empty is
    /// unset) and the default path given.
    pub fn load_from(
        explicit: Option<&Path>,
        env: Option<&OsStr>,
        default: &Path,
    ) -> Result<Config, ConfigError> {
        let (path, origin, required) = match (explicit, env.filter(|v| !v.is_empty())) {
            (Some(path), _) => (path.to_path_buf(), String::new(), true),
            (None, Some(env)) => (PathBuf::from(env), format!(" (from ${ENV_VAR})"), true),
            (None, None) => (default.to_path_buf(), String::new(), false),
        };
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| ConfigError::Read {
                path: path.clone(),
                origin: origin.clone(),
                message: "not UTF-8 text".to_string(),
            })?,
            Err(err) if !required && err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::defaults());
            }
            Err(err) => {
                return Err(ConfigError::Read {
                    path,
                    origin,
                    message: err.to_string(),
                })
            }
        };
        Config::parse(&text, &path)
    }

    /// The [`SandboxConfig`](crate::SandboxConfig) of sandbox `id` with
    /// these settings (the default size; no hostname or cgroup: the
    /// caller's).
    pub fn sandbox_config(&self, id: &str) -> crate::SandboxConfig {
        let h = &self.hypervisor;
        let mut config =
            crate::SandboxConfig::new(id, &h.vmm, &self.virtiofs.virtiofsd, &h.kernel, &h.initrd);
        config.vcpus = h.default_vcpus;
        config.memory_mib = h.default_memory_mib;
        config.kernel_cmdline_extra = h.kernel_params.clone();
        config.net_offloads = h.net_offloads;
        config.late_network = h.late_network;
        config.run_root = self.runtime.run_root.clone();
        config.log_level = self.runtime.log_level.clone();
        config.virtiofs_cache = self.virtiofs.cache.clone();
        config.start_timeout = Duration::from_secs(self.runtime.start_timeout_secs);
        config.stop_timeout = Duration::from_secs(self.runtime.stop_timeout_secs);
        config.jail = self.jail.uids();
        config.debug_busybox = self.debug.console.then(|| self.debug.busybox.clone());
        config.templates = self.runtime.templates;
        config.console = if self.runtime.guest_console {
            crate::Console::Kept
        } else {
            crate::Console::Off
        };
        config
    }

    /// A copy with a pod's annotations `io.isola.config.<name>` applied to
    /// the hypervisor settings: `default_vcpus` and `default_memory_mib`
    /// replace the file's (within its maxima), `kernel_params` is appended
    /// to the file's, `net_offloads` (true or false) replaces it. A name must be in `hypervisor.enable_annotations`;
    /// other annotations are ignored.
    pub fn with_annotations(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut ours: Vec<(&String, &String)> = annotations
            .iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        // The first error is the same whatever the map's order.
        ours.sort();
        let mut config = self.clone();
        let h = &mut config.hypervisor;
        for (annotation, value) in ours {
            let name = &annotation[ANNOTATION_PREFIX.len()..];
            if !self.hypervisor.enable_annotations.iter().any(|n| n == name) {
                return Err(ConfigError::AnnotationNotEnabled {
                    annotation: annotation.clone(),
                    name: name.to_string(),
                    path: self.path.clone(),
                    hint: if ANNOTATABLE.contains(&name) {
                        String::new()
                    } else {
                        format!(" (and cannot be: only {} can)", ANNOTATABLE.join(", "))
                    },
                });
            }
            let bad = |message: String| ConfigError::AnnotationValue {
                annotation: annotation.clone(),
                value: value.clone(),
                message,
            };
            match name {
                "default_vcpus" => {
                    h.default_vcpus = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=h.max_vcpus).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "must be a number of vCPUs from 1 to {} (hypervisor.max_vcpus)",
                                h.max_vcpus
                            ))
                        })?;
                }
                "default_memory_mib" => {
                    h.default_memory_mib = value
                        .parse()
                        .ok()
                        .filter(|n| (VMM_MIN_MEMORY_MIB..=h.max_memory_mib).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "must be MiB from {VMM_MIN_MEMORY_MIB} to {} \
                                 (hypervisor.max_memory_mib)",
                                h.max_memory_mib
                            ))
                        })?;
                }
                "kernel_params" => {
                    if let Some(problem) = kernel_params_problem(value) {
                        return Err(bad(problem.to_string()));
                    }
                    let extra = value.trim();
                    if !extra.is_empty() {
                        if !h.kernel_params.trim().is_empty() {
                            h.kernel_params.push(' ');
                        }
                        h.kernel_params.push_str(extra);
                    }
                }
                "net_offloads" => {
                    h.net_offloads = value
                        .parse()
                        .map_err(|_| bad("must be true or false".to_string()))?;
                }
                // enable_annotations holds only ANNOTATABLE names (validate).
                _ => {
                    return Err(bad(format!(
                        "`{name}` cannot be set by an annotation (only {} can)",
                        ANNOTATABLE.join(", ")
                    )))
                }
            }
        }
        Ok(config)
    }

    /// Checks every value against what isola can use.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            message,
        };
        if self.debug.console && !self.debug.busybox.is_absolute() {
            return Err(invalid(
                "debug.busybox",
                format!("{} must be an absolute path", self.debug.busybox.display()),
            ));
        }
        if let Some(uids) = self.jail.uids() {
            uids.validate()
                .map_err(|(key, message)| invalid(key, message))?;
            if !uids.lease_dir.is_absolute() {
                return Err(invalid(
                    "jail.lease_dir",
                    format!("{} must be an absolute path", uids.lease_dir.display()),
                ));
            }
        }
        let h = &self.hypervisor;
        if !(1..=VMM_MAX_VCPUS).contains(&h.max_vcpus) {
            return Err(invalid(
                "hypervisor.max_vcpus",
                format!(
                    "{} is out of range: isola-vmm boots 1 to {VMM_MAX_VCPUS} vCPUs",
                    h.max_vcpus
                ),
            ));
        }
        if !(1..=h.max_vcpus).contains(&h.default_vcpus) {
            return Err(invalid(
                "hypervisor.default_vcpus",
                format!(
                    "{} is out of range: must be from 1 to hypervisor.max_vcpus ({})",
                    h.default_vcpus, h.max_vcpus
                ),
            ));
        }
        if !(VMM_MIN_MEMORY_MIB..=VMM_MAX_MEMORY_MIB).contains(&h.max_memory_mib) {
            return Err(invalid(
                "hypervisor.max_memory_mib",
                format!(
                    "{} is out of range: isola-vmm takes {VMM_MIN_MEMORY_MIB} to \
                     {VMM_MAX_MEMORY_MIB} MiB",
                    h.max_memory_mib
                ),
            ));
        }
        if !(VMM_MIN_MEMORY_MIB..=h.max_memory_mib).contains(&h.default_memory_mib) {
            return Err(invalid(
                "hypervisor.default_memory_mib",
                format!(
                    "{} is out of range: must be from {VMM_MIN_MEMORY_MIB} to \
                     hypervisor.max_memory_mib ({})",
                    h.default_memory_mib, h.max_memory_mib
                ),
            ));
        }
        if let Some(problem) = kernel_params_problem(&h.kernel_params) {
            return Err(invalid("hypervisor.kernel_params", problem.to_string()));
        }
        if let Some(name) = h
            .enable_annotations
            .iter()
            .find(|n| !ANNOTATABLE.contains(&n.as_str()))
        {
            return Err(invalid(
                "hypervisor.enable_annotations",
                format!(
                    "{name:?} cannot be set by an annotation: the names are {}",
                    ANNOTATABLE.join(", ")
                ),
            ));
        }
        if !CACHE_MODES.contains(&self.virtiofs.cache.as_str()) {
            return Err(invalid(
                "virtiofs.cache",
                format!(
                    "{:?} is not a cache mode: use one of {}",
                    self.virtiofs.cache,
                    CACHE_MODES.join(", ")
                ),
            ));
        }
        if !LOG_LEVELS.contains(&self.runtime.log_level.as_str()) {
            return Err(invalid(
                "runtime.log_level",
                format!(
                    "{:?} is not a log level: use one of {}",
                    self.runtime.log_level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        for (key, path) in [
            ("hypervisor.vmm", &h.vmm),
            ("hypervisor.kernel", &h.kernel),
            ("hypervisor.initrd", &h.initrd),
            ("virtiofs.virtiofsd", &self.virtiofs.virtiofsd),
            ("runtime.run_root", &self.runtime.run_root),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{:?} must be an absolute path", path.display()),
                ));
            }
        }
        let run_root_len = self.runtime.run_root.as_os_str().len();
        if run_root_len > MAX_RUN_ROOT_LEN {
            return Err(invalid(
                "runtime.run_root",
                format!(
                    "{:?} is {run_root_len} bytes; at most {MAX_RUN_ROOT_LEN} fit: a sandbox's \
                     sockets (at shortest <run_root>/_hashed/<32 hex digits>/vsock.sock) must \
                     fit a Unix socket address ({} bytes)",
                    self.runtime.run_root.display(),
                    crate::sandbox::MAX_SOCKET_PATH
                ),
            ));
        }
        for (key, secs) in [
            (
                "runtime.start_timeout_secs",
                self.runtime.start_timeout_secs,
            ),
            ("runtime.stop_timeout_secs", self.runtime.stop_timeout_secs),
        ] {
            if secs == 0 {
                return Err(invalid(key, "must be at least 1 second".to_string()));
            }
            if secs > MAX_TIMEOUT_SECS {
                return Err(invalid(
                    key,
                    format!("{secs} is more than {MAX_TIMEOUT_SECS} seconds"),
                ));
            }
        }
        Ok(())
    }
}

/// The longest `runtime.run_root`: a sandbox's sockets must fit a Unix
/// socket address in its directory, which is at shortest
/// `<run_root>/_hashed/<32 hex digits>` ([`crate::share::sandbox_dir`]).
/// A root of at most 20 bytes keeps a CRI sandbox (64-character id) of the
/// `k8s.io` namespace at `<run_root>/k8s.io/<id>`.
pub const MAX_RUN_ROOT_LEN: usize =
    crate::sandbox::MAX_SOCKET_PATH - "/_hashed/".len() - 32 - "/vsock.sock".len();

/// Why `params` cannot go on the kernel command line, if it cannot.
fn kernel_params_problem(params: &str) -> Option<&'static str> {
    if params.contains('\n') || params.contains('\r') {
        Some("must be one line (no newline)")
    } else if params.contains('\0') {
        Some("must not contain a NUL character")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/isola/config.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE))
    }

    /// The error's message, which must name the file.
    fn error(text: &str) -> String {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(FILE), "{err}");
        err
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = parse("").expect("empty");
        assert_eq!(config.path, Path::new(FILE));
        assert_eq!(
            Config {
                path: PathBuf::from(BUILT_IN),
                ..config
            },
            Config::defaults()
        );
        let empty_sections = parse("[hypervisor]\n[virtiofs]\n[runtime]\n").expect("sections");
        assert_eq!(empty_sections, parse("").expect("empty"));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::defaults();
        assert_eq!(c.path, Path::new("(built-in defaults)"));
        assert_eq!(c.hypervisor.vmm, Path::new("/usr/local/bin/isola-vmm"));
        assert_eq!(
            c.hypervisor.kernel,
            Path::new("/usr/local/share/isola/vmlinux")
        );
        assert_eq!(
            c.hypervisor.initrd,
            Path::new("/usr/local/share/isola/initrd.img")
        );
        assert_eq!(
            (c.hypervisor.default_vcpus, c.hypervisor.default_memory_mib),
            (1, 256)
        );
        assert_eq!(
            (c.hypervisor.max_vcpus, c.hypervisor.max_memory_mib),
            (16, 16384)
        );
        assert_eq!(c.hypervisor.kernel_params, "");
        assert!(c.hypervisor.net_offloads);
        assert!(c.hypervisor.late_network);
        assert!(c.hypervisor.enable_annotations.is_empty());
        assert_eq!(
            c.virtiofs.virtiofsd,
            Path::new("/usr/local/libexec/isola/virtiofsd")
        );
        assert_eq!(c.virtiofs.cache, "auto");
        assert_eq!(c.runtime.log_level, "info");
        assert_eq!(c.runtime.run_root, Path::new("/run/isola/sandboxes"));
        assert_eq!(
            (c.runtime.start_timeout_secs, c.runtime.stop_timeout_secs),
            (60, 10)
        );
        assert!(c.runtime.host_cgroup_required);
        assert_eq!(
            c.sandbox_config("x").jail,
            Some(crate::jail::JailUids::default())
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn a_full_file_sets_every_key() {
        let text = r#"
[hypervisor]
vmm = "/opt/isola/bin/isola-vmm"
kernel = "/opt/isola/vmlinux"
initrd = "/opt/isola/initrd.img"
default_vcpus = 2
default_memory_mib = 512
max_vcpus = 8
max_memory_mib = 4096
kernel_params = "quiet loglevel=3"
net_offloads = false
late_network = false
enable_annotations = ["default_vcpus", "default_memory_mib", "kernel_params", "net_offloads"]

[virtiofs]
virtiofsd = "/usr/libexec/virtiofsd"
cache = "never"

[runtime]
log_level = "debug"
run_root = "/run/isola-test"
start_timeout_secs = 30
stop_timeout_secs = 5
host_cgroup_required = false
templates = false
guest_console = false

[jail]
enabled = false
first_uid = 3000000
uid_count = 100
lease_dir = "/run/isola-test/uids"

[debug]
console = true
busybox = "/opt/isola/busybox"
"#;
        let c = parse(text).expect("valid");
        assert_eq!(
            c,
            Config {
                path: PathBuf::from(FILE),
                hypervisor: Hypervisor {
                    vmm: "/opt/isola/bin/isola-vmm".into(),
                    kernel: "/opt/isola/vmlinux".into(),
                    initrd: "/opt/isola/initrd.img".into(),
                    default_vcpus: 2,
                    default_memory_mib: 512,
                    max_vcpus: 8,
                    max_memory_mib: 4096,
                    kernel_params: "quiet loglevel=3".into(),
                    net_offloads: false,
                    late_network: false,
                    enable_annotations: ANNOTATABLE.iter().map(|s| s.to_string()).collect(),
                },
                virtiofs: Virtiofs {
                    virtiofsd: "/usr/libexec/virtiofsd".into(),
                    cache: "never".into(),
                },
                runtime: Runtime {
                    log_level: "debug".into(),
                    run_root: "/run/isola-test".into(),
                    start_timeout_secs: 30,
                    stop_timeout_secs: 5,
                    host_cgroup_required: false,
                    templates: false,
                    guest_console: false,
                },
                jail: Jail {
                    enabled: false,
                    first_uid: 3_000_000,
                    uid_count: 100,
                    lease_dir: "/run/isola-test/uids".into(),
                },
                debug: Debug {
                    console: true,
                    busybox: "/opt/isola/busybox".into(),
                },
            }
        );
        assert_eq!(
            c.sandbox_config("x").debug_busybox.as_deref(),
            Some(Path::new("/opt/isola/busybox"))
        );
        let s = c.sandbox_config("pod-1");
        assert_eq!(s.id, "pod-1");
        assert_eq!(s.jail, None);
        assert_eq!(s.vmm, Path::new("/opt/isola/bin/isola-vmm"));
        assert_eq!(s.virtiofsd, Path::new("/usr/libexec/virtiofsd"));
        assert_eq!(s.kernel, Path::new("/opt/isola/vmlinux"));
        assert_eq!(s.initrd, Path::new("/opt/isola/initrd.img"));
        assert_eq!((s.vcpus, s.memory_mib), (2, 512));
        assert_eq!(s.kernel_cmdline_extra, "quiet loglevel=3");
        assert!(!s.net_offloads);
        assert!(
            s.cmdline().ends_with(" quiet loglevel=3"),
            "{}",
            s.cmdline()
        );
        assert_eq!(s.run_root, Path::new("/run/isola-test"));
        assert_eq!(s.log_level, "debug");
        assert_eq!(s.virtiofs_cache, "never");
        assert_eq!(s.start_timeout, Duration::from_secs(30));
        assert_eq!(s.stop_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let c = parse("[runtime]\nlog_level = \"warn\"\n").expect("valid");
        assert_eq!(c.runtime.log_level, "warn");
        assert_eq!(c.runtime.run_root, Runtime::default().run_root);
        assert_eq!(c.hypervisor, Hypervisor::default());
    }

    #[test]
    fn the_shipped_file_is_the_defaults() {
        let text = include_str!("../../configs/isola.toml");
        let c = Config::parse(text, Path::new("configs/isola.toml")).expect("configs/isola.toml");
        assert_eq!(
            Config {
                path: PathBuf::from(BUILT_IN),
                ..c
            },
            Config::defaults()
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_section() {
        let err = error("[hypervisor]\ndefault_vcpus = 1\nfoo = 2\n");
        assert!(
            err.contains(
                "unknown key `hypervisor.foo` in /etc/isola/config.toml (line 3, column 1)"
            ),
            "{err}"
        );
        assert!(err.contains("expected one of `vmm`"), "{err}");
        let err = error("[runtime]\nlog-level = \"info\"\n");
        assert!(err.contains("unknown key `runtime.log-level`"), "{err}");
        let err = error("[hypervisors]\n");
        assert!(err.contains("unknown key `hypervisors`"), "{err}");
        assert!(err.contains("`hypervisor`"), "{err}");
        let err = error("vcpus = 2\n");
        assert!(err.contains("unknown key `vcpus`"), "{err}");
    }

    #[test]
    fn type_errors_name_key_line_and_column() {
        let err = error("[hypervisor]\ndefault_vcpus = \"two\"\n");
        assert!(
            err.contains(
                "`hypervisor.default_vcpus` in /etc/isola/config.toml (line 2, column 17)"
            ),
            "{err}"
        );
        assert!(err.contains("invalid type: string \"two\""), "{err}");
        let err = error("[hypervisor]\ndefault_memory_mib = -1\n");
        assert!(err.contains("`hypervisor.default_memory_mib`"), "{err}");
        let err = error("[runtime]\nstart_timeout_secs = 1.5\n");
        assert!(err.contains("`runtime.start_timeout_secs`"), "{err}");
        let err = error("[hypervisor]\nenable_annotations = [\n  \"default_vcpus\",\n  3,\n]\n");
        assert!(
            err.contains("`hypervisor.enable_annotations[1]`")
                && err.contains("(line 4, column 3)"),
            "{err}"
        );
        let err = error("hypervisor = 3\n");
        assert!(err.contains("`hypervisor`"), "{err}");
        let err = error("[virtiofs]\ncache = true\n");
        assert!(err.contains("`virtiofs.cache`"), "{err}");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = error("[hypervisor]\ndefault_vcpus = \n");
        assert!(err.contains("not valid TOML"), "{err}");
        assert!(err.contains("(line 2, column"), "{err}");
        let err = error("[hypervisor\n");
        assert!(err.contains("not valid TOML"), "{err}");
        let err = error("[runtime]\nlog_level = \"info\"\nlog_level = \"warn\"\n");
        assert!(err.contains("(line 3, column 1)"), "{err}");
    }

    #[test]
    fn values_out_of_range_are_named() {
        let cases = [
            (
                "[hypervisor]\ndefault_vcpus = 0",
                "hypervisor.default_vcpus",
            ),
            (
                "[hypervisor]\ndefault_vcpus = 17",
                "hypervisor.default_vcpus",
            ),
            (
                "[hypervisor]\nmax_vcpus = 4\ndefault_vcpus = 5",
                "hypervisor.default_vcpus",
            ),
            ("[hypervisor]\nmax_vcpus = 0", "hypervisor.max_vcpus"),
            ("[jail]\nfirst_uid = 0", "jail.first_uid"),
            ("[jail]\nuid_count = 0", "jail.uid_count"),
            ("[jail]\nfirst_uid = 4294967290", "jail.first_uid"),
            ("[jail]\nlease_dir = \"uids\"", "jail.lease_dir"),
            ("[hypervisor]\nmax_vcpus = 255", "hypervisor.max_vcpus"),
            (
                "[hypervisor]\ndefault_memory_mib = 63",
                "hypervisor.default_memory_mib",
            ),
            (
                "[hypervisor]\nmax_memory_mib = 1024\ndefault_memory_mib = 2048",
                "hypervisor.default_memory_mib",
            ),
            (
                "[hypervisor]\nmax_memory_mib = 32",
                "hypervisor.max_memory_mib",
            ),
            (
                "[hypervisor]\nkernel_params = \"a\\nb\"",
                "hypervisor.kernel_params",
            ),
            (
                "[hypervisor]\nkernel_params = \"a\\u0000b\"",
                "hypervisor.kernel_params",
            ),
            (
                "[hypervisor]\nenable_annotations = [\"vmm\"]",
                "hypervisor.enable_annotations",
            ),
            ("[hypervisor]\nvmm = \"isola-vmm\"", "hypervisor.vmm"),
            ("[hypervisor]\nkernel = \"vmlinux\"", "hypervisor.kernel"),
            ("[hypervisor]\ninitrd = \"\"", "hypervisor.initrd"),
            (
                "[virtiofs]\nvirtiofsd = \"./virtiofsd\"",
                "virtiofs.virtiofsd",
            ),
            ("[virtiofs]\ncache = \"sometimes\"", "virtiofs.cache"),
            ("[runtime]\nlog_level = \"verbose\"", "runtime.log_level"),
            ("[runtime]\nrun_root = \"run\"", "runtime.run_root"),
            (
                "[runtime]\nrun_root = \"/run/a-run-root-much-much-longer-than-the-55-bytes-that-fit\"",
                "runtime.run_root",
            ),
            (
                "[runtime]\nstart_timeout_secs = 0",
                "runtime.start_timeout_secs",
            ),
            (
                "[runtime]\nstop_timeout_secs = 0",
                "runtime.stop_timeout_secs",
            ),
            (
                "[runtime]\nstart_timeout_secs = 18446744073709551615",
                "runtime.start_timeout_secs",
            ),
            (
                "[runtime]\nstop_timeout_secs = 3601",
                "runtime.stop_timeout_secs",
            ),
        ];
        for (text, key) in cases {
            let err = error(text);
            assert!(
                err.starts_with(&format!("`{key}` in {FILE}: ")),
                "{text}: {err}"
            );
        }
        let err = error("[virtiofs]\ncache = \"sometimes\"");
        assert!(err.contains("never, metadata, auto, always"), "{err}");
        for mode in CACHE_MODES {
            parse(&format!("[virtiofs]\ncache = \"{mode}\"")).expect(mode);
        }
        for level in LOG_LEVELS {
            parse(&format!("[runtime]\nlog_level = \"{level}\"")).expect(level);
        }
        parse("[hypervisor]\nmax_vcpus = 32\ndefault_vcpus = 32\ndefault_memory_mib = 64")
            .expect("the bounds themselves");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn load_prefers_explicit_then_env_then_default() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let explicit = write(
            tmp.path(),
            "explicit.toml",
            "[runtime]\nlog_level = \"error\"",
        );
        let env = write(tmp.path(), "env.toml", "[runtime]\nlog_level = \"warn\"");
        let default = write(
            tmp.path(),
            "default.toml",
            "[runtime]\nlog_level = \"debug\"",
        );
        let missing = tmp.path().join("missing.toml");
        let env_os = Some(env.as_os_str());

        let c = Config::load_from(Some(&explicit), env_os, &default).expect("explicit");
        assert_eq!(
            (c.path.as_path(), c.runtime.log_level.as_str()),
            (explicit.as_path(), "error")
        );
        let c = Config::load_from(None, env_os, &default).expect("env");
        assert_eq!(
            (c.path.as_path(), c.runtime.log_level.as_str()),
            (env.as_path(), "warn")
        );
        let c = Config::load_from(None, None, &default).expect("default");
        assert_eq!(
            (c.path.as_path(), c.runtime.log_level.as_str()),
            (default.as_path(), "debug")
        );
        // An empty variable is no variable.
        let c = Config::load_from(None, Some(OsStr::new("")), &default).expect("empty env");
        assert_eq!(c.path, default);

        // A missing default file is the defaults; a missing named one is an error.
        assert_eq!(
            Config::load_from(None, None, &missing),
            Ok(Config::defaults())
        );
        let err = Config::load_from(Some(&missing), env_os, &default)
            .expect_err("missing explicit")
            .to_string();
        assert!(
            err.starts_with(&format!("reading the isola config {}: ", missing.display())),
            "{err}"
        );
        let err = Config::load_from(None, Some(missing.as_os_str()), &default)
            .expect_err("missing env")
            .to_string();
        assert!(
            err.contains(&format!("{} (from $ISOLA_CONFIG)", missing.display())),
            "{err}"
        );

        // A directory where the default file should be is an error, not
        // the defaults.
        let err = Config::load_from(None, None, tmp.path())
            .expect_err("directory")
            .to_string();
        assert!(err.contains("reading the isola config"), "{err}");

        // Errors in a loaded file name that file.
        let bad = write(tmp.path(), "bad.toml", "[virtiofs]\nfoo = 1\n");
        let err = Config::load_from(Some(&bad), None, &default)
            .expect_err("bad key")
            .to_string();
        assert!(
            err.contains(&format!("unknown key `virtiofs.foo` in {}", bad.display())),
            "{err}"
        );
        let binary = tmp.path().join("binary.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let err = Config::load_from(Some(&binary), None, &default)
            .expect_err("not utf-8")
            .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn allowed_annotations_override_the_hypervisor() {
        let c = parse(
            "[hypervisor]\nkernel_params = \"quiet\"\nmax_vcpus = 4\nmax_memory_mib = 1024\n\
             enable_annotations = [\"default_vcpus\", \"default_memory_mib\", \"kernel_params\", \"net_offloads\"]",
        )
        .expect("valid");
        let a = annotations(&[
            ("io.isola.config.default_vcpus", "4"),
            ("io.isola.config.default_memory_mib", "1024"),
            ("io.isola.config.kernel_params", "loglevel=7"),
            ("io.isola.config.net_offloads", "false"),
            ("io.kubernetes.cri.sandbox-id", "abc"),
        ]);
        let out = c.with_annotations(&a).expect("allowed");
        assert_eq!(out.hypervisor.default_vcpus, 4);
        assert_eq!(out.hypervisor.default_memory_mib, 1024);
        assert_eq!(out.hypervisor.kernel_params, "quiet loglevel=7");
        assert!(!out.hypervisor.net_offloads);
        assert!(!out.sandbox_config("p").net_offloads);
        assert_eq!(out.path, c.path);
        assert_eq!(out.runtime, c.runtime);
        // The original is unchanged; no annotations, no change.
        assert_eq!(c.hypervisor.default_vcpus, 1);
        assert_eq!(c.with_annotations(&HashMap::new()), Ok(c.clone()));
    }

    #[test]
    fn annotations_not_enabled_are_refused() {
        let c = parse("[hypervisor]\nenable_annotations = [\"default_vcpus\"]").expect("valid");
        let err = c
            .with_annotations(&annotations(&[(
                "io.isola.config.default_memory_mib",
                "512",
            )]))
            .expect_err("not enabled")
            .to_string();
        assert_eq!(
            err,
            "annotation `io.isola.config.default_memory_mib` is not allowed: `default_memory_mib` \
             is not in hypervisor.enable_annotations of /etc/isola/config.toml"
        );
        let err = c
            .with_annotations(&annotations(&[("io.isola.config.vmm", "/tmp/evil")]))
            .expect_err("never annotatable")
            .to_string();
        assert!(
            err.contains("`vmm` is not in hypervisor.enable_annotations of /etc/isola/config.toml")
                && err.contains(
                    "only default_vcpus, default_memory_mib, kernel_params, net_offloads can"
                ),
            "{err}"
        );
        let err = Config::defaults()
            .with_annotations(&annotations(&[("io.isola.config.default_vcpus", "2")]))
            .expect_err("nothing enabled by default")
            .to_string();
        assert!(err.contains("(built-in defaults)"), "{err}");
    }

    #[test]
    fn bad_annotation_values_are_named() {
        let c = parse(
            "[hypervisor]\nmax_vcpus = 4\nmax_memory_mib = 1024\n\
             enable_annotations = [\"default_vcpus\", \"default_memory_mib\", \"kernel_params\", \"net_offloads\"]",
        )
        .expect("valid");
        let cases = [
            ("net_offloads", "no"),
            ("net_offloads", "False"),
            ("net_offloads", ""),
            ("default_vcpus", "0"),
            ("default_vcpus", "5"),
            ("default_vcpus", "two"),
            ("default_vcpus", " 2"),
            ("default_memory_mib", "63"),
            ("default_memory_mib", "2048"),
            ("default_memory_mib", "-1"),
            ("kernel_params", "a\nb"),
            ("kernel_params", "a\0b"),
        ];
        for (name, value) in cases {
            let annotation = format!("{ANNOTATION_PREFIX}{name}");
            let err = c
                .with_annotations(&annotations(&[(&annotation, value)]))
                .expect_err(value)
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "annotation `{annotation}` has a bad value {value:?}: "
                )),
                "{err}"
            );
        }
    }
}
