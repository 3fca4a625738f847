//! virtiofsd (the Rust one the KVM host set-up installs, `isola_virtiofsd`
//! in scripts/lib.sh) serving a host directory to a test VM.

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The virtiofsd to run: `$ISOLA_VIRTIOFSD`, else the one scripts/lib.sh
/// installs into the cache, else the first on PATH.
pub fn virtiofsd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ISOLA_VIRTIOFSD") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("ISOLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/isola")));
    if let Some(cached) = cache.map(|c| c.join("tools/bin/virtiofsd")) {
        if cached.exists() {
            return cached;
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.exists())
        .expect("no virtiofsd: tests/kvm-host/setup-emulated installs it (isola_virtiofsd)")
}

/// A virtiofsd serving `shared` on `socket`, in a process group of its own.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Virtiofsd {
    pub fn start(socket: &Path, shared: &Path) -> Virtiofsd {
        let bin = virtiofsd_binary();
        let mut child = Command::new(&bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "namespace"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("virtiofsd| {line}");
                log2.lock().unwrap().push(line);
            }
        });
        let mut fsd = Virtiofsd { child, log };
        // Listening once the socket exists (bind and listen are one step).
        let until = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Some(status) = fsd.child.try_wait().unwrap() {
                panic!(
                    "virtiofsd exited ({status}) before listening:\n{}",
                    fsd.log.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < until,
                "virtiofsd did not create {} within 60 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fsd
    }

    /// Sends `signal` to virtiofsd and the processes its sandbox forked.
    /// virtiofsd and the processes its sandbox forked (its process
    /// group), as pids.
    pub fn group_pids(&self) -> Vec<u32> {
        let pgid = self.child.id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // The process group is the 5th field of stat, after the
                // command's closing parenthesis (3 fields later).
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        let rest = stat.rsplit_once(')')?.1.to_string();
                        rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                    })
                    == Some(pgid)
            })
            .collect()
    }

    pub fn signal_group(&self, signal: libc::c_int) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group we created; no pointers.
        unsafe { libc::kill(-pgid, signal) };
    }

    /// kill -9 of virtiofsd and the processes its sandbox forked (also
    /// ends a stopped one).
    pub fn kill9(&mut self) {
        self.signal_group(libc::SIGKILL);
        self.signal_group(libc::SIGCONT);
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill9();
    }
}
