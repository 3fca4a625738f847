//! `pause`: the process of a pod's sandbox container (containerd's
//! `sandbox_image`). It holds the pod's namespaces, reaps the orphans that
//! reach it as PID 1, and exits 0 on SIGTERM or SIGINT, as Kubernetes'
//! pause does. Built static, it is the only file of isola's pause image
//! (`make pause-image`), so pods need no registry.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("isola pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    // Taken synchronously: no handler runs at an arbitrary point.
    if let Err(err) = set.thread_block() {
        eprintln!("pause: blocking signals: {err}");
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => std::process::exit(0),
            Err(err) => {
                eprintln!("pause: sigwait: {err}");
                std::process::exit(1);
            }
        }
    }
}

/// Reaps every child that has exited.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
