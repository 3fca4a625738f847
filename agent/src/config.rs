//! Agent options, read from `agent.*` arguments of the kernel command line.
//!
//! The VMM (or the shim, through it) passes options as `agent.KEY=VALUE`
//! words; everything else on the command line belongs to the kernel and is
//! ignored here. Unknown `agent.*` keys are reported, not fatal: an older
//! agent must still boot under a newer shim.

use std::time::Duration;

use thiserror::Error;
use tracing::Level;

/// Default hostname until a sandbox gives one.
pub const DEFAULT_HOSTNAME: &str = "isola";

/// Default time processes get between SIGTERM and SIGKILL at shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most verbose level that is logged (`agent.log=`).
    pub log_level: Level,
    /// Most verbose level that also goes to the console
    /// (`agent.console=`; the host's log stream gets every logged record).
    /// `None`: as `log_level`.
    pub console_level: Option<Level>,
    /// Hostname set at boot (`agent.hostname=`).
    pub hostname: String,
    /// Grace period between SIGTERM and SIGKILL at shutdown, in seconds
    /// (`agent.shutdown_timeout=`).
    pub shutdown_timeout: Duration,
    /// Guest-physical address of the VMM's boot-timer byte
    /// (`agent.boot_timer=0xADDR`, added by isola-vmm): the agent writes
    /// 123 there once it is ready.
    pub boot_timer: Option<u64>,
    /// This boot makes a template VM (`agent.template=1`, added by
    /// isola-vmm): what every sandbox needs is made before the agent is
    /// ready, so that the template is saved with it.
    pub template: bool,
    /// `agent.*` keys this agent does not know, kept to be reported.
    pub unknown: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: Level::INFO,
            console_level: None,
            hostname: DEFAULT_HOSTNAME.to_string(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            boot_timer: None,
            template: false,
            unknown: Vec::new(),
        }
    }
}

/// A malformed `agent.*` argument.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("agent.log: unknown level {0:?} (expected error, warn, info, debug or trace)")]
    LogLevel(String),
    #[error("agent.console: unknown level {0:?} (expected error, warn, info, debug or trace)")]
    ConsoleLevel(String),
    #[error("agent.hostname: {0:?} is not a valid hostname (1-64 characters of a-z, A-Z, 0-9, '-' and '.')")]
    Hostname(String),
    #[error("agent.shutdown_timeout: {0:?} is not a whole number of seconds from 0 to 3600")]
    ShutdownTimeout(String),
    #[error("agent.boot_timer: {0:?} is not a hexadecimal address below 2^52 (like 0xd1000000)")]
    BootTimer(String),
    #[error("agent.template: {0:?} is not 0 or 1")]
    Template(String),
    #[error("{0}: expected agent.KEY=VALUE")]
    MissingValue(String),
}

impl Config {
    /// Parses the kernel command line (the contents of `/proc/cmdline`).
    ///
    /// Returns the options and the errors of the arguments that could not be
    /// used; a bad argument keeps its default so the guest still boots and
    /// the error reaches the console.
    pub fn from_cmdline(cmdline: &str) -> (Config, Vec<ConfigError>) {
        let mut config = Config::default();
        let mut errors = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some(option) = word.strip_prefix("agent.") else {
                continue;
            };
            let Some((key, value)) = option.split_once('=') else {
                errors.push(ConfigError::MissingValue(word.to_string()));
                continue;
            };
            match key {
                "log" => match parse_level(value) {
                    Some(level) => config.log_level = level,
                    None => errors.push(ConfigError::LogLevel(value.to_string())),
                },
                "console" => match parse_level(value) {
                    Some(level) => config.console_level = Some(level),
                    None => errors.push(ConfigError::ConsoleLevel(value.to_string())),
                },
                "hostname" => {
                    if valid_hostname(value) {
                        config.hostname = value.to_string();
                    } else {
                        errors.push(ConfigError::Hostname(value.to_string()));
                    }
                }
                "shutdown_timeout" => match value.parse::<u64>() {
                    Ok(secs) if secs <= 3600 => config.shutdown_timeout = Duration::from_secs(secs),
                    _ => errors.push(ConfigError::ShutdownTimeout(value.to_string())),
                },
                "boot_timer" => match value
                    .strip_prefix("0x")
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .filter(|a| *a < (1 << 52))
                {
                    Some(addr) => config.boot_timer = Some(addr),
                    None => errors.push(ConfigError::BootTimer(value.to_string())),
                },
                "template" => match value {
                    "0" => config.template = false,
                    "1" => config.template = true,
                    _ => errors.push(ConfigError::Template(value.to_string())),
                },
                _ => config.unknown.push(key.to_string()),
            }
        }
        (config, errors)
    }
}

fn parse_level(value: &str) -> Option<Level> {
    match value.to_ascii_lowercase().as_str() {
        "error" => Some(Level::ERROR),
        "warn" | "warning" => Some(Level::WARN),
        "info" => Some(Level::INFO),
        "debug" => Some(Level::DEBUG),
        "trace" => Some(Level::TRACE),
        _ => None,
    }
}

/// RFC 1123 host name, as the kernel's 64-byte UTS field can hold it.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The fuzz target `agent_cmdline` (fuzz/, which includes this file) and
/// its corpus replay below: parses `data` as a command line; every option
/// must be valid or its default, and survive a round trip through its
/// `agent.*` form.
#[doc(hidden)]
#[cfg_attr(not(test), allow(dead_code))]
pub fn fuzz_cmdline(data: &[u8]) {
    let (config, errors) = Config::from_cmdline(&String::from_utf8_lossy(data));
    for error in &errors {
        let _ = error.to_string();
    }
    assert!(
        config.hostname == DEFAULT_HOSTNAME || valid_hostname(&config.hostname),
        "hostname {:?}",
        config.hostname
    );
    assert!(config.shutdown_timeout <= Duration::from_secs(3600));
    assert!(config.boot_timer.map_or(true, |a| a < 1 << 52));
    let mut again = format!(
        "agent.log={} agent.hostname={} agent.shutdown_timeout={}",
        config.log_level,
        config.hostname,
        config.shutdown_timeout.as_secs()
    );
    if let Some(addr) = config.boot_timer {
        again.push_str(&format!(" agent.boot_timer={addr:#x}"));
    }
    if let Some(level) = config.console_level {
        again.push_str(&format!(" agent.console={level}"));
    }
    if config.template {
        again.push_str(" agent.template=1");
    }
    let (reparsed, errors) = Config::from_cmdline(&again);
    assert!(errors.is_empty(), "{again}: {errors:?}");
    let unknown = config.unknown.clone();
    assert_eq!(
        Config {
            unknown,
            ..reparsed
        },
        config,
        "{again}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_agent_arguments() {
        let (config, errors) = Config::from_cmdline("console=ttyS0 reboot=k panic=1\n");
        assert_eq!(config, Config::default());
        assert!(errors.is_empty());
    }

    #[test]
    fn reads_agent_arguments_among_kernel_ones() {
        let (config, errors) = Config::from_cmdline(
            "console=ttyS0 agent.log=debug quiet agent.hostname=pod-1 agent.shutdown_timeout=2",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.log_level, Level::DEBUG);
        assert_eq!(config.hostname, "pod-1");
        assert_eq!(config.shutdown_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_keep_defaults_and_are_reported() {
        let (config, errors) = Config::from_cmdline(
            "agent.log=loud agent.hostname=-bad agent.shutdown_timeout=x agent.debug",
        );
        assert_eq!(config.log_level, Level::INFO);
        assert_eq!(config.hostname, DEFAULT_HOSTNAME);
        assert_eq!(config.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(
            errors,
            vec![
                ConfigError::LogLevel("loud".into()),
                ConfigError::Hostname("-bad".into()),
                ConfigError::ShutdownTimeout("x".into()),
                ConfigError::MissingValue("agent.debug".into()),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_kept_for_reporting() {
        let (config, errors) = Config::from_cmdline("agent.future_option=1 agent.log=WARN");
        assert!(errors.is_empty());
        assert_eq!(config.log_level, Level::WARN);
        assert_eq!(config.unknown, vec!["future_option".to_string()]);
    }

    #[test]
    fn console_level() {
        let (config, errors) = Config::from_cmdline("agent.log=debug agent.console=warn");
        assert!(errors.is_empty());
        assert_eq!(config.console_level, Some(Level::WARN));
        let (config, errors) = Config::from_cmdline("agent.console=everything");
        assert_eq!(config.console_level, None);
        assert_eq!(errors, vec![ConfigError::ConsoleLevel("everything".into())]);
    }

    #[test]
    fn boot_timer_address() {
        let (config, errors) = Config::from_cmdline("agent.boot_timer=0xd1000000");
        assert!(errors.is_empty());
        assert_eq!(config.boot_timer, Some(0xd100_0000));
        let (config, errors) =
            Config::from_cmdline("agent.boot_timer=1234 agent.boot_timer=0xfffffffffffffff");
        assert_eq!(config.boot_timer, None);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn a_template_boot() {
        assert!(
            !Config::from_cmdline("agent.boot_timer=0xd1000000")
                .0
                .template
        );
        let (config, errors) = Config::from_cmdline("agent.template=1");
        assert!(errors.is_empty() && config.template);
        let (config, errors) = Config::from_cmdline("agent.template=1 agent.template=0");
        assert!(errors.is_empty() && !config.template);
        let (config, errors) = Config::from_cmdline("agent.template=yes");
        assert!(!config.template);
        assert_eq!(errors, vec![ConfigError::Template("yes".into())]);
    }

    #[test]
    fn hostname_rules() {
        assert!(valid_hostname("isola"));
        assert!(valid_hostname("a.b-c.d9"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a..b"));
        assert!(!valid_hostname("under_score"));
        assert!(!valid_hostname("trailing."));
        assert!(!valid_hostname(&"x".repeat(65)));
    }

    /// The fuzz target's corpus (fuzz/corpus/agent_cmdline) replayed.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/agent_cmdline");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            fuzz_cmdline(&bytes);
            n += 1;
        }
        assert!(n > 0, "{} is empty", dir.display());
    }
}
