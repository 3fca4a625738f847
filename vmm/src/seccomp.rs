//! Per-thread seccomp filters (rust-vmm's `seccompiler`).
//!
//! Every VMM thread installs the filter of its kind before the guest runs
//! its first instruction: the vCPU threads before their first `KVM_RUN`
//! (they then wait at a gate until the main thread has installed its own),
//! the API, console and vhost-user watchdog threads before their creator
//! goes on. Each filter
//! allows only the system calls its thread makes, `ioctl` only with the
//! requests that thread issues (`KVM_RUN` on a vCPU thread), `socket` only
//! for Unix sockets. Anything else traps: the SIGSYS handler writes one
//! line naming the thread and the system call to stderr and ends the
//! process with status [`EXIT_SECCOMP`]. `--no-seccomp` turns the filters
//! off for debugging.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a VMM killed by its seccomp filter.
pub const EXIT_SECCOMP: i32 = 159;

/// The kinds of threads the VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread, once it runs the event loop.
    EventLoop,
    /// The main thread of a jailed VMM ([`crate::jail`]): the event loop
    /// without `socket`, `connect`, `unlink` and `unlinkat` (its sockets
    /// were made before the jail; there is no host path to reach or
    /// remove in it).
    JailedEventLoop,
    /// The event loop of a template VM (`--template`): it also saves the
    /// VM ([`SNAPSHOT_IOCTLS`], `fsync`, the state file's rename).
    TemplateEventLoop,
    /// [`ThreadKind::JailedEventLoop`] of a template VM (`fsync`, no
    /// rename: the jail's supervisor renames the state file).
    JailedTemplateEventLoop,
    /// A vCPU thread.
    Vcpu,
    /// The API's accept thread and its per-client threads.
    Api,
    /// The console writer.
    Console,
    /// A vhost-user connection's request watchdog (virtio-fs).
    Watchdog,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::JailedEventLoop => "event loop (jailed)",
            ThreadKind::TemplateEventLoop => "event loop (template)",
            ThreadKind::JailedTemplateEventLoop => "event loop (template, jailed)",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Api => "API",
            ThreadKind::Console => "console",
            ThreadKind::Watchdog => "vhost-user watchdog",
        }
    }
}

const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)` and `_IOR(KVMIO, 0x83, struct
/// kvm_sregs)`: a vCPU reads its own registers to log where a guest that
/// triple-faulted was.
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
/// `_IOR(KVMIO, nr, T)` and `_IOWR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u64) -> u64 {
    (2 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
}
const fn kvm_iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
}

/// What saving a template VM asks of KVM: every vCPU's state (from the
/// main thread, once the vCPU threads ended) and the VM's.
const SNAPSHOT_IOCTLS: &[u64] = {
    use kvm_bindings::*;
    &[
        kvm_iowr::<kvm_cpuid2>(0x91),     // KVM_GET_CPUID2
        kvm_iowr::<kvm_msrs>(0x88),       // KVM_GET_MSRS
        KVM_GET_REGS,                     // (also a vCPU's)
        KVM_GET_SREGS,                    // (also a vCPU's)
        kvm_ior::<kvm_xsave>(0xa4),       // KVM_GET_XSAVE
        kvm_ior::<kvm_xcrs>(0xa6),        // KVM_GET_XCRS
        kvm_ior::<kvm_debugregs>(0xa1),   // KVM_GET_DEBUGREGS
        kvm_ior::<kvm_lapic_state>(0x8e), // KVM_GET_LAPIC
        kvm_ior::<kvm_mp_state>(0x98),    // KVM_GET_MP_STATE
        kvm_ior::<kvm_vcpu_events>(0x9f), // KVM_GET_VCPU_EVENTS
        0xaea3,                           // KVM_GET_TSC_KHZ (_IO)
        kvm_iowr::<kvm_irqchip>(0x62),    // KVM_GET_IRQCHIP
        kvm_ior::<kvm_pit_state2>(0x9f),  // KVM_GET_PIT2
        kvm_ior::<kvm_clock_data>(0x7c),  // KVM_GET_CLOCK
    ]
};

const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
/// virtio-net sets a tap's offloads when the driver's features are known.
/// The tap's other ioctls (TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ) are made
/// at start, before any filter.
const TUNSETOFFLOAD: u64 = crate::devices::virtio::net::tap::TUNSETOFFLOAD;

thread_local! {
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// What every thread does: memory, locks, signals, time, logging to
/// stderr, closing descriptors, ending.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The event loop: epoll, eventfds, signalfd, timerfds, the vsock device's
/// Unix sockets (accept, read, write), virtio-net's taps (read, write;
/// `write`/`writev` are in [`COMMON`]), kicking vCPU threads. Unjailed, it
/// also has [`UNJAILED_EVENT_LOOP`].
const EVENT_LOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_getrusage,
    libc::SYS_getsockopt,
    libc::SYS_lseek,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_stat,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_timerfd_settime,
];

/// What only an unjailed event loop does: connect the guest's vsock
/// connections to host sockets (`socket` is allowed for Unix sockets
/// only), remove its sockets at exit.
const UNJAILED_EVENT_LOOP: &[i64] = &[libc::SYS_connect, libc::SYS_unlink, libc::SYS_unlinkat];

/// The API threads: accept clients, a thread each (clone and what a new
/// thread does first), read a line with a timeout, answer, back off.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_clock_nanosleep,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fcntl,
    libc::SYS_nanosleep,
    libc::SYS_prctl,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
];

/// The vhost-user watchdog: waits on a condition variable (futex, with a
/// timeout) and shuts down a socket whose request took too long.
const WATCHDOG: &[i64] = &[libc::SYS_shutdown];

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// The rules of one kind of thread.
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[i64] = match kind {
        ThreadKind::EventLoop
        | ThreadKind::JailedEventLoop
        | ThreadKind::TemplateEventLoop
        | ThreadKind::JailedTemplateEventLoop => EVENT_LOOP,
        ThreadKind::Api => API,
        ThreadKind::Watchdog => WATCHDOG,
        ThreadKind::Vcpu | ThreadKind::Console => &[],
    };
    let unjailed: &[i64] = match kind {
        ThreadKind::EventLoop | ThreadKind::TemplateEventLoop => UNJAILED_EVENT_LOOP,
        _ => &[],
    };
    // A jailed template's state file is renamed into place by the jail's
    // supervisor ([`crate::jail::Publish`]), not by the VMM.
    let template: &[i64] = match kind {
        ThreadKind::TemplateEventLoop => &[
            libc::SYS_fsync,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
        ],
        ThreadKind::JailedTemplateEventLoop => &[libc::SYS_fsync],
        _ => &[],
    };
    for nr in COMMON.iter().chain(extra).chain(unjailed).chain(template) {
        rules.insert(*nr, Vec::new());
    }
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(
                libc::SYS_ioctl,
                vec![
                    arg_eq(1, KVM_RUN)?,
                    arg_eq(1, KVM_GET_REGS)?,
                    arg_eq(1, KVM_GET_SREGS)?,
                ],
            );
        }
        ThreadKind::EventLoop
        | ThreadKind::JailedEventLoop
        | ThreadKind::TemplateEventLoop
        | ThreadKind::JailedTemplateEventLoop => {
            let mut ioctls = vec![
                arg_eq(1, FIONBIO)?,
                arg_eq(1, FIOCLEX)?,
                arg_eq(1, TUNSETOFFLOAD)?,
            ];
            if matches!(
                kind,
                ThreadKind::TemplateEventLoop | ThreadKind::JailedTemplateEventLoop
            ) {
                for &nr in SNAPSHOT_IOCTLS {
                    ioctls.push(arg_eq(1, nr)?);
                }
            }
            rules.insert(libc::SYS_ioctl, ioctls);
            if matches!(kind, ThreadKind::EventLoop | ThreadKind::TemplateEventLoop) {
                rules.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
            }
        }
        ThreadKind::Api | ThreadKind::Console | ThreadKind::Watchdog => {}
    }
    Ok(rules)
}

/// Compiles the filter of `kind` to BPF.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs the filter of `kind` on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), seccompiler::Error> {
    let prog = program(kind)?;
    THREAD_KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(&prog)
}

/// Spawns a thread that first installs the filter of `kind` (if given),
/// and returns once it has: the thread never runs its work unfiltered, and
/// a filter that cannot be installed is the caller's error.
pub fn spawn_filtered<F>(
    name: &str,
    stack_size: usize,
    kind: Option<ThreadKind>,
    work: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .stack_size(stack_size)
        .spawn(move || {
            let installed = match kind {
                Some(kind) => install(kind).map_err(|e| e.to_string()),
                None => Ok(()),
            };
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            if ok {
                work();
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(err)) => Err(std::io::Error::other(format!(
            "installing the seccomp filter of thread {name}: {err}"
        ))),
        Err(_) => Err(std::io::Error::other(format!(
            "thread {name} died at start"
        ))),
    }
}

/// Installs the SIGSYS handler that reports a violation and ends the
/// process (once, before any filter).
pub fn install_violation_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Writes `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only write(2) and _exit(2): both allowed by every filter.
    // SAFETY: for SIGSYS the kernel fills siginfo's `_sigsys` member: the
    // call address (8 bytes at offset 16), then the syscall number (an int
    // at offset 24); `info` points at a whole siginfo_t.
    let nr = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let thread = THREAD_KIND.with(Cell::get);
    let mut digits = [0u8; 20];
    let parts: [&[u8]; 5] = [
        b"isola-vmm: fatal: the ",
        thread.as_bytes(),
        b" thread made system call ",
        decimal(nr.max(0) as u64, &mut digits),
        b", which its seccomp filter does not allow; stopping (run with --no-seccomp to debug)\n",
    ];
    for part in parts {
        // SAFETY: writing a valid byte slice to stderr.
        unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: ends the process at once, without unwinding or destructors.
    unsafe { libc::_exit(EXIT_SECCOMP) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the test `name` alone in a new process with `env` set (a
    /// filter stays for good once installed).
    fn run_child(name: &str, env: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture"])
            .env(env, "1")
            .output()
            .unwrap()
    }

    #[test]
    fn the_register_ioctls_are_the_kernel_numbers() {
        // _IOR: direction read (2) << 30 | size << 16 | type << 8 | nr.
        let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
    }

    #[test]
    fn every_filter_compiles() {
        for kind in [
            ThreadKind::EventLoop,
            ThreadKind::JailedEventLoop,
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Console,
            ThreadKind::Watchdog,
        ] {
            let prog = program(kind).unwrap();
            assert!(!prog.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn the_jailed_event_loop_cannot_reach_or_remove_host_paths() {
        let free = rules(ThreadKind::EventLoop).unwrap();
        let jailed = rules(ThreadKind::JailedEventLoop).unwrap();
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ] {
            assert!(free.contains_key(&nr), "{nr}");
            assert!(!jailed.contains_key(&nr), "{nr}");
        }
        // Everything else is the same filter.
        assert_eq!(free.len(), jailed.len() + 4);
        assert!(jailed.keys().all(|nr| free.contains_key(nr)));
    }

    /// Run by `a_jailed_event_loop_dies_on_connect` in a process of its own.
    #[test]
    fn jailed_connect_child() {
        if std::env::var_os("ISOLA_SECCOMP_JAILED_CHILD").is_none() {
            return;
        }
        install_violation_handler().unwrap();
        install(ThreadKind::JailedEventLoop).unwrap();
        // SAFETY: a connect on a descriptor that is not open, with no
        // address: EBADF if the filter let it through.
        unsafe { libc::connect(-1, std::ptr::null(), 0) };
        unreachable!("connect went through the jailed event loop's filter");
    }

    #[test]
    fn a_jailed_event_loop_dies_on_connect() {
        let out = run_child(
            "seccomp::tests::jailed_connect_child",
            "ISOLA_SECCOMP_JAILED_CHILD",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
        let nr = libc::SYS_connect.to_string();
        assert!(
            stderr.contains(&format!(
                "the event loop (jailed) thread made system call {nr},"
            )),
            "{stderr}"
        );
    }

    #[test]
    fn decimal_digits() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(231, &mut b), b"231");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }

    /// Run by `a_forbidden_call_kills_with_a_clear_line` in a process of
    /// its own (a filter is for good once installed); a no-op otherwise.
    #[test]
    fn forbidden_call_child() {
        if std::env::var_os("ISOLA_SECCOMP_CHILD").is_none() {
            return;
        }
        install_violation_handler().unwrap();
        install(ThreadKind::Console).unwrap();
        // SAFETY: a plain system call the console filter forbids.
        unsafe { libc::syscall(libc::SYS_getppid) };
        unreachable!("the filter let getppid through");
    }

    /// Run by `the_event_loop_may_set_tap_offloads` in a process of its own.
    #[test]
    fn tap_offload_child() {
        if std::env::var_os("ISOLA_SECCOMP_TAP_CHILD").is_none() {
            return;
        }
        install_violation_handler().unwrap();
        install(ThreadKind::EventLoop).unwrap();
        // SAFETY: an ioctl on a descriptor that is not open: EBADF, if the
        // filter lets it through.
        let ret = unsafe { libc::ioctl(-1, TUNSETOFFLOAD, 0 as libc::c_ulong) };
        assert_eq!(ret, -1);
        println!("tap offload ioctl allowed");
        // SAFETY: the tap's set-up ioctl, which only runs before the filter.
        unsafe { libc::ioctl(-1, libc::TUNSETIFF as libc::c_ulong, 0 as libc::c_ulong) };
        unreachable!("TUNSETIFF went through the event loop's filter");
    }

    #[test]
    fn the_event_loop_may_set_tap_offloads_and_nothing_more() {
        let out = run_child(
            "seccomp::tests::tap_offload_child",
            "ISOLA_SECCOMP_TAP_CHILD",
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains("tap offload ioctl allowed"),
            "{stdout}{stderr}"
        );
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
        let nr = libc::SYS_ioctl.to_string();
        assert!(
            stderr.contains(&format!("the event loop thread made system call {nr},")),
            "{stderr}"
        );
    }

    #[test]
    fn a_forbidden_call_kills_with_a_clear_line() {
        let out = run_child(
            "seccomp::tests::forbidden_call_child",
            "ISOLA_SECCOMP_CHILD",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
        let nr = libc::SYS_getppid.to_string();
        assert!(
            stderr.contains(&format!(
                "the console thread made system call {nr}, which its seccomp filter does not allow"
            )),
            "{stderr}"
        );
    }
}
