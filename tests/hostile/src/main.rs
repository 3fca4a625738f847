//! isola-hostile: the init of a test guest that attacks its VMM.
//!
//! Test-only (tests/e2e/tests/hostile.rs boots it; it is never in the
//! product initrd). It mounts what it needs, prints `hostile: ready` on the
//! console and serves a control stream on vsock port [`CONTROL_PORT`]: the
//! test sends one command per line and gets `done <command> <detail>` back
//! once the attack has run, so the test measures the VMM between attacks
//! without fixed sleeps.
//!
//! Commands:
//! - `rng-reset`: resets the virtio-rng device through its MMIO window
//!   (Status = 0) and notifies its queue: a reset device that is notified
//!   must cost its VMM nothing. (This and `bad-queue` first unbind the
//!   guest's own rng driver, so the guest kernel does not trip over the
//!   device being sabotaged under it: the VMM is under test, not the guest.)
//! - `bad-queue N`: N rounds of bad queue sizes and ring addresses on the
//!   virtio-rng window, each walked to DRIVER_OK (activation must fail,
//!   quietly).
//! - `connect-flood N`: N vsock connections to a host port nobody serves.
//! - `churn PORT N`: N connect-then-close to host port PORT.
//! - `sink PORT`: listens on PORT and accepts host connections it never
//!   reads.
//! - `echo PORT`: listens on PORT and echoes every byte.
//! - `serial-flood SECONDS`: writes to the serial console as fast as it
//!   can for SECONDS (guest time).
//! - `raw SECONDS LISTENING-PORT DEAD-PORT`: takes the vsock and rng
//!   devices from their kernel drivers and attacks them with raw
//!   virtqueues (see [`raw`]); answers at once, starts once the host has
//!   closed the control stream, reports on the console.
//!
//! Booted with `hostile.virtiofs=TAG` on the kernel command line, it does
//! not serve the control stream: it mounts the virtio-fs share TAG on
//! `/mnt` ([`virtiofs`]), prints `hostile: virtiofs read N HEX` (the bytes
//! of `/mnt/from-host.bin`), writes them reversed to
//! `/mnt/from-guest.bin`, prints `hostile: virtiofs wrote N`, and then
//! reboots (`hostile.virtiofs_then=reboot`, the default) or prints
//! `hostile: virtiofs idle` and stays up (`hostile.virtiofs_then=idle`),
//! or prints `hostile: virtiofs looping` and reads the file again and
//! again (`hostile.virtiofs_then=readloop`).
//! Any failure prints `hostile: virtiofs failed: ...` and reboots.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

mod raw;
mod virtiofs;

/// The control stream's vsock port.
pub const CONTROL_PORT: u32 = 5000;
const HOST_CID: u32 = 2;

/// virtio-mmio registers (virtio 1.2, 4.2.2).
mod reg {
    pub const DEVICE_ID: usize = 0x08;
    pub const DRIVER_FEATURES: usize = 0x20;
    pub const DRIVER_FEATURES_SEL: usize = 0x24;
    pub const QUEUE_SEL: usize = 0x30;
    pub const QUEUE_NUM: usize = 0x38;
    pub const QUEUE_READY: usize = 0x44;
    pub const QUEUE_NOTIFY: usize = 0x50;
    pub const STATUS: usize = 0x70;
    pub const QUEUE_DESC_LOW: usize = 0x80;
    pub const QUEUE_DESC_HIGH: usize = 0x84;
    pub const QUEUE_AVAIL_LOW: usize = 0x90;
    pub const QUEUE_USED_LOW: usize = 0xa0;
}

pub(crate) fn say(msg: &str) {
    // The console is stdout (init's stdio is /dev/console).
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "hostile: {msg}");
    let _ = out.flush();
}

pub(crate) fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings and a null data pointer.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One device's 4 KiB virtio-mmio window, mapped through /dev/mem.
struct Window {
    base: *mut u8,
}

impl Window {
    fn map(phys: u64) -> io::Result<Window> {
        let path =
            CString::new("/dev/mem").map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: opening a path with a valid C string.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_SYNC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: maps one page of /dev/mem at a page-aligned physical
        // address; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                phys as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window { base: base.cast() })
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `offset` is one of the register offsets, inside the
        // mapped page and 4-byte aligned; MMIO needs a volatile access.
        unsafe { std::ptr::read_volatile(self.base.add(offset).cast::<u32>()) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.base.add(offset).cast::<u32>(), value) }
    }
}

/// The value of `key=` on the kernel command line `cmdline`.
pub(crate) fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// The virtio-mmio windows the kernel command line declares.
fn windows() -> Vec<u64> {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("virtio_mmio.device="))
        .filter_map(|spec| {
            let (_, rest) = spec.split_once('@')?;
            let base = rest.split(':').next()?;
            u64::from_str_radix(base.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

/// The window of the first device with virtio id `id`.
fn find_device(id: u32) -> io::Result<Window> {
    for base in windows() {
        let w = Window::map(base)?;
        if w.read(reg::DEVICE_ID) == id {
            return Ok(w);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio device with id {id}"),
    ))
}

/// Unbinds the guest kernel's driver from the virtio device with id `id`,
/// so the attacks on its registers cannot trip the guest's own kernel;
/// returns the device's name and the driver it had (None if none).
fn unbind_driver(id: u32) -> io::Result<(String, Option<std::path::PathBuf>)> {
    let want = format!("0x{id:04x}");
    for entry in fs::read_dir("/sys/bus/virtio/devices")? {
        let path = entry?.path();
        let dev = fs::read_to_string(path.join("device")).unwrap_or_default();
        if dev.trim() != want {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let driver = fs::canonicalize(path.join("driver")).ok();
        if let Some(d) = &driver {
            fs::write(d.join("unbind"), &name)?;
        }
        return Ok((name, driver));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio device {want} in /sys/bus/virtio/devices"),
    ))
}

fn rng_reset() -> io::Result<String> {
    unbind_driver(4)?;
    let rng = find_device(4)?;
    rng.write(reg::STATUS, 0);
    for _ in 0..3 {
        rng.write(reg::QUEUE_NOTIFY, 0);
    }
    Ok("reset and notified".into())
}

fn bad_queue(rounds: u32) -> io::Result<String> {
    unbind_driver(4)?;
    let rng = find_device(4)?;
    let sizes = [0u32, 3, 65535, 1 << 20];
    let addrs = [0xffff_f000u32, 0x1001, 0xdead_beef, 0];
    for i in 0..rounds {
        rng.write(reg::STATUS, 0);
        rng.write(reg::STATUS, 1);
        rng.write(reg::STATUS, 1 | 2);
        rng.write(reg::DRIVER_FEATURES_SEL, 1);
        rng.write(reg::DRIVER_FEATURES, 1);
        rng.write(reg::STATUS, 1 | 2 | 8);
        rng.write(reg::QUEUE_SEL, i % 3);
        rng.write(reg::QUEUE_NUM, sizes[i as usize % sizes.len()]);
        let a = addrs[i as usize % addrs.len()];
        rng.write(reg::QUEUE_DESC_LOW, a);
        rng.write(reg::QUEUE_DESC_HIGH, i);
        rng.write(reg::QUEUE_AVAIL_LOW, a | 1);
        rng.write(reg::QUEUE_USED_LOW, a | 2);
        rng.write(reg::QUEUE_READY, 1);
        rng.write(reg::STATUS, 1 | 2 | 8 | 4);
        rng.write(reg::QUEUE_NOTIFY, 0);
    }
    Ok(format!(
        "{rounds} rounds, status now {:#x}",
        rng.read(reg::STATUS)
    ))
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_connect(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(fd)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: `addr` is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::bind(
            raw,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on a bound socket we own.
    if rc != 0 || unsafe { libc::listen(raw, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> io::Result<std::fs::File> {
    // SAFETY: accept on a listening socket we own, no address wanted.
    let fd = unsafe {
        libc::accept4(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept and is owned here; a File
    // reads and writes it like any stream.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn connect_flood(n: u32) -> String {
    let (mut refused, mut other) = (0u32, 0u32);
    for _ in 0..n {
        match vsock_connect(9) {
            Ok(_) => other += 1,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => refused += 1,
            Err(_) => other += 1,
        }
    }
    format!("{refused} reset, {other} other")
}

fn churn(port: u32, n: u32) -> String {
    let (mut ok, mut failed) = (0u32, 0u32);
    for _ in 0..n {
        match vsock_connect(port) {
            Ok(fd) => {
                ok += 1;
                drop(fd);
            }
            Err(_) => failed += 1,
        }
    }
    format!("{ok} connected, {failed} failed")
}

/// Accepts host connections on `port` in a thread; each is handed to `serve`.
fn serve_port(port: u32, serve: fn(std::fs::File)) -> io::Result<String> {
    let listener = vsock_listen(port)?;
    std::thread::spawn(move || loop {
        match vsock_accept(&listener) {
            Ok(conn) => {
                std::thread::spawn(move || serve(conn));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    });
    Ok(format!("listening on {port}"))
}

/// Holds a connection open and never reads it.
fn never_read(conn: std::fs::File) {
    let _keep = conn;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn echo(mut conn: std::fs::File) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Writes to the serial console as fast as the tty takes it for
/// `seconds`. (The guest kernel has no ioperm or /dev/port, so the UART's
/// driver paces it: a few KiB a second in the emulated KVM host.)
fn serial_flood(seconds: u64) -> io::Result<String> {
    let mut tty = fs::OpenOptions::new().write(true).open("/dev/ttyS0")?;
    let mut line = [b'#'; 1024];
    line[1023] = b'\n';
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut bytes = 0u64;
    while Instant::now() < until {
        tty.write_all(&line)?;
        bytes += line.len() as u64;
    }
    Ok(format!("{bytes} bytes"))
}

/// An attack that must wait until the host has closed the control stream
/// (the raw one takes the vsock device from its driver: started at once,
/// it could cut the stream before the reply reached the host).
type Deferred = Option<Box<dyn FnOnce() + Send>>;

fn run(command: &str, deferred: &mut Deferred) -> String {
    let mut words = command.split_whitespace();
    let name = words.next().unwrap_or("");
    let mut num =
        |default: u64| -> u64 { words.next().and_then(|w| w.parse().ok()).unwrap_or(default) };
    let result = match name {
        "rng-reset" => rng_reset(),
        "bad-queue" => bad_queue(num(300) as u32),
        "connect-flood" => Ok(connect_flood(num(1000) as u32)),
        "churn" => {
            let port = num(6000) as u32;
            Ok(churn(port, num(1000) as u32))
        }
        "sink" => serve_port(num(5001) as u32, never_read),
        "echo" => serve_port(num(5002) as u32, echo),
        "serial-flood" => serial_flood(num(5)),
        "raw" => {
            let secs = num(8);
            let ports = (num(6100) as u32, num(6101) as u32);
            *deferred = Some(Box::new(move || raw::run(secs, ports)));
            Ok(format!(
                "starts when this stream closes, {secs} s per flood"
            ))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown command {other:?}"),
        )),
    };
    match result {
        Ok(detail) => format!("done {name} {detail}"),
        Err(err) => format!("failed {name} {err}"),
    }
}

fn control() -> io::Result<()> {
    let listener = vsock_listen(CONTROL_PORT)?;
    say("ready");
    loop {
        let conn = vsock_accept(&listener)?;
        let mut writer = conn.try_clone()?;
        let mut deferred: Deferred = None;
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            say(&format!("running {line}"));
            let reply = run(&line, &mut deferred);
            say(&reply);
            if writeln!(writer, "{reply}").is_err() {
                break;
            }
        }
        drop(writer);
        if let Some(attack) = deferred {
            std::thread::spawn(attack);
        }
    }
}

fn main() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(err) = mount(source, target, fstype) {
            say(&format!("mounting {target}: {err}"));
        }
    }
    virtiofs::run_if_asked();
    if let Err(err) = control() {
        say(&format!("control stream failed: {err}"));
    }
    // PID 1 must not exit (the kernel would panic): idle until stopped.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
