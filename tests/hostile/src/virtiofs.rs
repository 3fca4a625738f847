//! `hostile.virtiofs=TAG`: mount a virtio-fs share, read what the host put
//! there, write something back, report on the console (see the crate
//! documentation for the lines), then reboot, idle, or read the host's
//! file again and again (`readloop`: each read opens the file, a FUSE
//! request the back end must answer).

use std::fs;
use std::io::{self, Write};
use std::time::Duration;

use crate::{cmdline_value, mount, say};

/// Where the share is mounted.
const MOUNT_POINT: &str = "/mnt";
/// Most bytes of the host's file read (a test file, a few hundred bytes).
const MAX_READ: u64 = 64 << 10;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Mounts the share, reads the host's file and writes it back reversed.
fn exercise(tag: &str) -> io::Result<()> {
    mount(tag, MOUNT_POINT, "virtiofs")
        .map_err(|e| io::Error::new(e.kind(), format!("mount -t virtiofs {tag}: {e}")))?;
    let path = format!("{MOUNT_POINT}/from-host.bin");
    let size = fs::metadata(&path)?.len();
    if size > MAX_READ {
        return Err(io::Error::other(format!("{path} is {size} bytes")));
    }
    let data = fs::read(&path)?;
    say(&format!("virtiofs read {} {}", data.len(), hex(&data)));
    let reversed: Vec<u8> = data.iter().rev().copied().collect();
    let mut out = fs::File::create(format!("{MOUNT_POINT}/from-guest.bin"))?;
    out.write_all(&reversed)?;
    out.sync_all()?;
    drop(out);
    say(&format!("virtiofs wrote {}", reversed.len()));
    Ok(())
}

fn reboot() -> ! {
    // SAFETY: tcdrain(3), sync(2) and reboot(2) take no pointers; as PID 1
    // with CAP_SYS_BOOT the reboot ends the VM (reboot=k: the VMM exits 0).
    // tcdrain first: what `say` wrote may still sit in the console tty's
    // buffer, and a reboot drops it (a result line was once cut short).
    unsafe {
        libc::tcdrain(libc::STDOUT_FILENO);
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs the virtio-fs mode if the command line asks for it (never returns
/// then); returns at once otherwise.
pub fn run_if_asked() {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(tag) = cmdline_value(&cmdline, "hostile.virtiofs") else {
        return;
    };
    let then = cmdline_value(&cmdline, "hostile.virtiofs_then").unwrap_or_default();
    if let Err(err) = exercise(&tag) {
        say(&format!("virtiofs failed: {err}"));
        reboot();
    }
    if then == "readloop" {
        say("virtiofs looping");
        let path = format!("{MOUNT_POINT}/from-host.bin");
        loop {
            if let Err(err) = fs::read(&path) {
                say(&format!("virtiofs failed: {err}"));
                reboot();
            }
        }
    }
    if then != "idle" {
        reboot();
    }
    say("virtiofs idle");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_command_line() {
        let line = "quiet hostile.virtiofs=share hostile.virtiofs_then=idle panic=1";
        assert_eq!(
            cmdline_value(line, "hostile.virtiofs").as_deref(),
            Some("share")
        );
        assert_eq!(
            cmdline_value(line, "hostile.virtiofs_then").as_deref(),
            Some("idle")
        );
        assert_eq!(cmdline_value("quiet", "hostile.virtiofs"), None);
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
