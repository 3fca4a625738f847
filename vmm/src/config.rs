//! What a VM is made of, as given on the command line, validated.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::arch::layout::CMDLINE_MAX;

/// vCPUs at most: the MP table must fit the 1 KiB EBDA.
pub const MAX_VCPUS: u8 = 32;
/// Memory bounds in MiB: below the minimum a guest kernel does not boot.
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The first guest CID (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;

/// The kernel command line used when none is given: no PCI or modules,
/// `reboot=k` so a guest reboot is an i8042 reset (the VMM exits), a dead
/// init reboots after a second, and the i8042 is not probed beyond need.
pub const DEFAULT_CMDLINE: &str = "reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux \
     i8042.nopnp i8042.dumbkbd";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// No serial device at all: costs nothing.
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for Console {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "off" => Ok(Console::Off),
            "stdout" => Ok(Console::Stdout),
            "" => Err(ConfigError::Console),
            path => Ok(Console::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Console::Off => f.write_str("off"),
            Console::Stdout => f.write_str("stdout"),
            Console::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("kernel {0}: no such file")]
    KernelMissing(PathBuf),
    #[error("initrd {0}: no such file")]
    InitrdMissing(PathBuf),
    #[error("--vcpus {0}: must be from 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("--memory {0}: must be from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB")]
    Memory(u64),
    #[error("--vsock-cid {0}: must be from {MIN_GUEST_CID} to {max}", max = u32::MAX - 1)]
    Cid(u64),
    #[error("--console: expected off, stdout or a file path")]
    Console,
    #[error("kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The command line without the parts the VMM adds (console,
    /// virtio-mmio devices).
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub vsock: Option<PathBuf>,
    pub vsock_cid: u64,
    pub console: Console,
    /// Most bytes a console file gets (`--console-limit`); the rest is
    /// dropped and counted.
    pub console_limit: u64,
    pub api_socket: Option<PathBuf>,
    /// Per-thread seccomp filters (`--no-seccomp` turns them off).
    pub seccomp: bool,
    /// The VMM runs in its jail ([`crate::jail`]): the event loop gets the
    /// jailed filter, and the API socket's file is not removed at the end.
    pub jailed: bool,
    /// A template VM: guest RAM in `DIR/memory`, saved on the API's
    /// `snapshot` ([`crate::snapshot`]).
    pub template: Option<PathBuf>,
    /// A clone: restored from the template in this directory (no kernel
    /// is booted; vCPUs, memory and the command line are the template's).
    pub restore: Option<PathBuf>,
    /// A template that saves itself when the guest is ready (the boot
    /// timer), or fails if it is not within this long.
    pub save_when_ready: Option<std::time::Duration>,
}

impl VmConfig {
    /// Validates the raw values of the command line.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
        vcpus: u32,
        memory_mib: u64,
        vsock: Option<PathBuf>,
        vsock_cid: u64,
        console: Console,
        api_socket: Option<PathBuf>,
    ) -> Result<VmConfig, ConfigError> {
        if !kernel.is_file() {
            return Err(ConfigError::KernelMissing(kernel));
        }
        if let Some(initrd) = &initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        let vcpus = u8::try_from(vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::Vcpus(vcpus))?;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::Memory(memory_mib));
        }
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&vsock_cid) {
            return Err(ConfigError::Cid(vsock_cid));
        }
        let cmdline = cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let config = VmConfig {
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            vsock,
            vsock_cid,
            console,
            console_limit: crate::devices::console::DEFAULT_CONSOLE_LIMIT,
            api_socket,
            seccomp: true,
            jailed: false,
            template: None,
            restore: None,
            save_when_ready: None,
        };
        // The full line (with what the VMM adds) is checked when it is built;
        // the user's part alone must already fit.
        if config.cmdline.len() >= CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(config.cmdline.len()));
        }
        Ok(config)
    }

    /// A clone's configuration: what the template in `dir` was (`vcpus`,
    /// `memory_mib`, `vsock_cid`, `cmdline`, from its state) with this
    /// VM's own vsock socket, console and API socket.
    #[allow(clippy::too_many_arguments)]
    pub fn for_restore(
        dir: PathBuf,
        cmdline: String,
        vcpus: u8,
        memory_mib: u64,
        vsock: Option<PathBuf>,
        vsock_cid: u64,
        console: Console,
        api_socket: Option<PathBuf>,
    ) -> Result<VmConfig, ConfigError> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(ConfigError::Vcpus(u32::from(vcpus)));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::Memory(memory_mib));
        }
        Ok(VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline,
            vcpus,
            memory_mib,
            vsock,
            vsock_cid,
            console,
            console_limit: crate::devices::console::DEFAULT_CONSOLE_LIMIT,
            api_socket,
            seccomp: true,
            jailed: false,
            template: None,
            restore: Some(dir),
            save_when_ready: None,
        })
    }

    /// The console part of the command line the VMM adds.
    pub fn console_cmdline(&self) -> &'static str {
        match self.console {
            Console::Off => "8250.nr_uarts=0",
            Console::Stdout | Console::File(_) => "console=ttyS0 8250.nr_uarts=1",
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> PathBuf {
        // Any existing file stands in for a kernel here.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn cfg(vcpus: u32, mem: u64) -> Result<VmConfig, ConfigError> {
        VmConfig::new(
            kernel(),
            None,
            None,
            vcpus,
            mem,
            None,
            3,
            Console::Stdout,
            None,
        )
    }

    #[test]
    fn accepts_sane_values() {
        let c = cfg(2, 512).unwrap();
        assert_eq!((c.vcpus, c.memory_bytes()), (2, 512 << 20));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(cfg(0, 128), Err(ConfigError::Vcpus(0)));
        assert_eq!(cfg(33, 128), Err(ConfigError::Vcpus(33)));
        assert_eq!(cfg(300, 128), Err(ConfigError::Vcpus(300)));
        assert_eq!(cfg(1, 16), Err(ConfigError::Memory(16)));
        let missing = PathBuf::from("/nonexistent/vmlinux");
        let err = VmConfig::new(
            missing.clone(),
            None,
            None,
            1,
            128,
            None,
            3,
            Console::Off,
            None,
        )
        .unwrap_err();
        assert_eq!(err, ConfigError::KernelMissing(missing));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
        let err = VmConfig::new(
            kernel(),
            Some("/no/initrd".into()),
            None,
            1,
            128,
            None,
            3,
            Console::Off,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/no/initrd"));
        let err =
            VmConfig::new(kernel(), None, None, 1, 128, None, 2, Console::Off, None).unwrap_err();
        assert_eq!(err, ConfigError::Cid(2));
        let long = "x".repeat(CMDLINE_MAX);
        let err = VmConfig::new(
            kernel(),
            None,
            Some(long),
            1,
            128,
            None,
            3,
            Console::Off,
            None,
        )
        .unwrap_err();
        assert_eq!(err, ConfigError::CmdlineTooLong(CMDLINE_MAX));
    }

    #[test]
    fn console_values() {
        assert_eq!("off".parse::<Console>(), Ok(Console::Off));
        assert_eq!("stdout".parse::<Console>(), Ok(Console::Stdout));
        assert_eq!(
            "/tmp/c.log".parse::<Console>(),
            Ok(Console::File("/tmp/c.log".into()))
        );
        assert_eq!("".parse::<Console>(), Err(ConfigError::Console));
        let off = VmConfig::new(kernel(), None, None, 1, 128, None, 3, Console::Off, None).unwrap();
        assert!(!off.console_cmdline().contains("console="));
    }
}
