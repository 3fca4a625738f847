//! QEMU's `microvm` machine: the reference VMM the project measures itself
//! against, and the way guests were booted before isola-vmm existed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::console::Console;
use crate::GuestImages;

/// The kernel command line every test boot starts from: serial console,
/// `reboot=k` so a guest reboot ends the VMM, `panic=1` so a dead init does
/// too, and the i8042 options that skip its slow probing.
pub const BASE_CMDLINE: &str = isola_vmm::config::DEFAULT_CMDLINE;

/// How to boot a guest under QEMU microvm.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub images: GuestImages,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to [`BASE_CMDLINE`].
    pub extra_cmdline: String,
    /// Print console lines to stderr as they arrive.
    pub echo: bool,
    /// Serial console on stdout (read by [`QemuVm::console`]); off means no
    /// UART at all, as isola-vmm's `--console off`.
    pub console: bool,
    /// A vhost-vsock device with this guest CID.
    pub vsock_cid: Option<u32>,
}

impl QemuConfig {
    pub fn new(images: GuestImages) -> Self {
        QemuConfig {
            images,
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: String::new(),
            echo: true,
            console: true,
            vsock_cid: None,
        }
    }

    fn command(&self, qmp: &Path) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        let machine = if self.console {
            "microvm,x-option-roms=off,rtc=off,acpi=off"
        } else {
            "microvm,x-option-roms=off,rtc=off,acpi=off,isa-serial=off"
        };
        cmd.args([
            "-M",
            machine,
            "-enable-kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // Ctrl-Alt-Del (the power-off request) and reboot=k need it.
            "-device",
            "i8042",
        ]);
        if self.console {
            cmd.args(["-serial", "stdio"]);
        }
        if let Some(cid) = self.vsock_cid {
            cmd.arg("-device")
                .arg(format!("vhost-vsock-device,guest-cid={cid}"));
        }
        cmd.arg("-m").arg(self.memory_mib.to_string());
        cmd.arg("-smp").arg(self.vcpus.to_string());
        cmd.arg("-kernel").arg(&self.images.kernel);
        cmd.arg("-initrd").arg(&self.images.initrd);
        let console = if self.console {
            "console=ttyS0 8250.nr_uarts=1"
        } else {
            "8250.nr_uarts=0"
        };
        cmd.arg("-append")
            .arg(format!("{BASE_CMDLINE} {console} {}", self.extra_cmdline).trim_end());
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// A running QEMU microvm; killed on drop if still running.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    pub console: Console,
    qmp_path: PathBuf,
    pub started: Instant,
}

impl QemuVm {
    /// Starts QEMU; `scratch` holds its QMP socket.
    pub fn start(config: &QemuConfig, scratch: &Path) -> Result<QemuVm> {
        let qmp_path = scratch.join("qmp.sock");
        let started = Instant::now();
        let mut child = config
            .command(&qmp_path)
            .spawn()
            .context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let stderr = child.stderr.take().context("qemu stderr")?;
        // QEMU's own messages go to the test's stderr, marked.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("qemu| {line}");
            }
        });
        Ok(QemuVm {
            child,
            console: Console::spawn(stdout, config.echo),
            qmp_path,
            started,
        })
    }

    /// Asks the guest to power off: Ctrl-Alt-Del on its i8042 keyboard.
    pub fn request_power_off(&self) -> Result<()> {
        let mut qmp = Qmp::connect(&self.qmp_path, Duration::from_secs(30))?;
        qmp.execute(
            "send-key",
            json!({"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"}
            ]}),
        )?;
        Ok(())
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        crate::wait_child_exit(&mut self.child, &mut self.console, "QEMU", deadline)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

/// A minimal QMP client: greeting, capabilities negotiation, commands.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, retrying until the socket exists or `deadline` passes.
    pub fn connect(path: &Path, deadline: Duration) -> Result<Qmp> {
        let until = Instant::now() + deadline;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(err) if Instant::now() >= until => {
                    return Err(err)
                        .with_context(|| format!("connecting to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command`; returns its `return` value, or its error as one.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}")?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                bail!("QMP {command} failed: {err}");
            }
            // Anything else is an asynchronous event: skip it.
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }
}
