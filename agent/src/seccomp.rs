//! The OCI spec's `linux.seccomp`, compiled to classic BPF in pure Rust
//! with `seccompiler` (libcontainer's libseccomp feature cannot be linked
//! into the static agent), and installed by the agent's executor in the
//! container process right before it execs.
//!
//! # Semantics
//!
//! An OCI profile has a default action and rules, each with its own action
//! (and errno); a seccompiler filter has one match action and one mismatch
//! action. The profile becomes a *stack* of filters, and the kernel runs
//! every filter of the stack and applies the most restrictive result
//! (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > TRACE > LOG > ALLOW;
//! seccomp(2)):
//!
//! - the *default filter*, installed first (only when the default action
//!   is not ALLOW): a syscall (with its argument conditions) named by any
//!   rule whose action differs from the default gets ALLOW; everything
//!   else gets the default action;
//! - one filter per other action (a distinct action and errno/trace value
//!   each, ALLOW and the default excepted): the syscalls of the rules with
//!   that action get it; everything else gets ALLOW.
//!
//! So a syscall no rule names gets the default action; one that matches a
//! rule gets that rule's action. Where the OCI profile is ambiguous (a call
//! matching rules with different actions) the most restrictive of them
//! wins. Within a rule, argument conditions are ANDed; several rules for
//! one syscall and action are ORed. Arguments compare as 64-bit values;
//! `SCMP_CMP_MASKED_EQ` is `(arg & value) == valueTwo`, as in libseccomp.
//!
//! Unknown syscall names are skipped with a debug log, as runc does (a
//! profile names syscalls of newer kernels and other architectures). Only
//! the native architecture's syscalls pass: every filter starts with an
//! architecture check that kills the process on any other ABI, so the
//! compatible architectures a profile may list (`SCMP_ARCH_X86`,
//! `SCMP_ARCH_X32` beside `SCMP_ARCH_X86_64`) are accepted and their
//! syscalls refused. Other architectures, `SCMP_ACT_NOTIFY` and
//! `listenerPath` are `INVALID_ARGUMENT` naming the field.
//!
//! Without `noNewPrivileges` the kernel installs a filter only for a
//! process with CAP_SYS_ADMIN. runc installs such filters before dropping
//! capabilities; libcontainer's executor runs after the drop, so when the
//! kernel refuses (EACCES) the executor sets no_new_privs for the process
//! and installs the filters then (setuid binaries do not gain privileges
//! in such a container).

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::spec::SpecError;

/// The compiled profile: filters in installation order, and the flags for
/// `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub filters: Vec<BpfProgram>,
    pub flags: u32,
}

#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

/// Architectures whose presence in `architectures` is accepted (the
/// native one first).
#[cfg(target_arch = "x86_64")]
const ACCEPTED_ARCHES: &[Arch] = &[
    Arch::ScmpArchX86_64,
    Arch::ScmpArchNative,
    Arch::ScmpArchX86,
    Arch::ScmpArchX32,
];
#[cfg(target_arch = "aarch64")]
const ACCEPTED_ARCHES: &[Arch] = &[
    Arch::ScmpArchAarch64,
    Arch::ScmpArchNative,
    Arch::ScmpArchArm,
];

/// What a rule matches, for one syscall of one filter.
#[derive(Debug, Clone)]
enum Matches {
    /// Every call.
    Always,
    /// Calls matching any of the rules.
    Any(Vec<SeccompRule>),
}

impl Matches {
    fn add(&mut self, rule: Option<SeccompRule>) {
        match (self, rule) {
            (Matches::Always, _) => {}
            (this @ Matches::Any(_), None) => *this = Matches::Always,
            (Matches::Any(rules), Some(rule)) => rules.push(rule),
        }
    }

    fn into_rules(self) -> Vec<SeccompRule> {
        match self {
            // seccompiler: an empty chain matches the syscall
            // unconditionally.
            Matches::Always => Vec::new(),
            Matches::Any(rules) => rules,
        }
    }
}

type Table = BTreeMap<i64, Matches>;

fn add(table: &mut Table, nr: i64, rule: Option<SeccompRule>) {
    match table.get_mut(&nr) {
        Some(m) => m.add(rule),
        None => {
            let mut m = Matches::Any(Vec::new());
            m.add(rule);
            table.insert(nr, m);
        }
    }
}

fn err(field: String, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// The seccompiler action of an OCI action.
fn action(
    action: LinuxSeccompAction,
    errno: Option<u32>,
    field: &str,
) -> Result<SeccompAction, SpecError> {
    let eperm = libc::EPERM as u32;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(eperm)),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(eperm)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(err(
                field.to_string(),
                "SCMP_ACT_NOTIFY is not supported (no seccomp agent in the guest)",
            ))
        }
    })
}

fn operator(op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (SeccompCmpOp, u64) {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, value),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, value),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, value),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, value),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, value),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, value),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (SeccompCmpOp::MaskedEq(value), value_two.unwrap_or(0))
        }
    }
}

/// The syscall number of `name` on this architecture.
fn syscall_number(name: &str) -> Option<i64> {
    name.parse::<syscalls::Sysno>()
        .ok()
        .map(|s| i64::from(s.id()))
}

/// Compiles `linux.seccomp` (field names in errors are relative to the
/// spec: `linux.seccomp....`).
pub fn compile(profile: &LinuxSeccomp) -> Result<Compiled, SpecError> {
    const F: &str = "linux.seccomp";
    if profile.listener_path().is_some() {
        return Err(err(
            format!("{F}.listenerPath"),
            "seccomp notify listeners are not supported",
        ));
    }
    if let Some(arches) = profile.architectures() {
        for (i, arch) in arches.iter().enumerate() {
            if !ACCEPTED_ARCHES.contains(arch) {
                return Err(err(
                    format!("{F}.architectures[{i}]"),
                    format!("{arch:?} is not supported by this guest ({TARGET:?})"),
                ));
            }
        }
    }
    let mut flags = 0u32;
    for flag in profile.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => {
                flags |= libc::SECCOMP_FILTER_FLAG_LOG as u32
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                flags |= libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32
            }
            // One thread at exec: synchronising threads means nothing.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => {}
            // Only for notify listeners, which are refused above.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {}
        }
    }

    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        &format!("{F}.defaultAction"),
    )?;
    // The syscalls (with conditions) of every rule whose action differs
    // from the default: the default filter lets them through.
    let mut not_default = Table::new();
    // Per action (by its BPF return value, errno included).
    let mut by_action: BTreeMap<u32, (SeccompAction, Table)> = BTreeMap::new();

    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("{F}.syscalls[{i}]");
        let act = action(sc.action(), sc.errno_ret(), &format!("{field}.action"))?;
        if act == default {
            continue;
        }
        let mut conditions = Vec::new();
        for (j, arg) in sc.args().iter().flatten().enumerate() {
            let index = u8::try_from(arg.index())
                .ok()
                .filter(|&i| i <= 5)
                .ok_or_else(|| {
                    err(
                        format!("{field}.args[{j}].index"),
                        format!("{} is not an argument index (0 to 5)", arg.index()),
                    )
                })?;
            let (op, value) = operator(arg.op(), arg.value(), arg.value_two());
            conditions.push(
                SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                    .map_err(|e| err(format!("{field}.args[{j}]"), e.to_string()))?,
            );
        }
        let rule = if conditions.is_empty() {
            None
        } else {
            Some(
                SeccompRule::new(conditions)
                    .map_err(|e| err(format!("{field}.args"), e.to_string()))?,
            )
        };
        for name in sc.names() {
            let Some(nr) = syscall_number(name) else {
                tracing::debug!(syscall = %name, "unknown syscall in the seccomp profile skipped");
                continue;
            };
            add(&mut not_default, nr, rule.clone());
            if act != SeccompAction::Allow {
                let key = u32::from(act.clone());
                let table = &mut by_action
                    .entry(key)
                    .or_insert_with(|| (act.clone(), Table::new()))
                    .1;
                add(table, nr, rule.clone());
            }
        }
    }

    let build = |table: Table, mismatch: SeccompAction, matched: SeccompAction| {
        let rules = table
            .into_iter()
            .map(|(nr, m)| (nr, m.into_rules()))
            .collect();
        SeccompFilter::new(rules, mismatch, matched, TARGET)
            .and_then(BpfProgram::try_from)
            .map_err(|e| err(F.to_string(), format!("compiling the filter: {e}")))
    };
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(not_default, default, SeccompAction::Allow)?);
    }
    for (_, (act, table)) in by_action {
        filters.push(build(table, SeccompAction::Allow, act)?);
    }
    Ok(Compiled { filters, flags })
}

/// Installs one filter on the calling thread.
pub fn install(filter: &BpfProgram, flags: u32) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccompiler's sock_filter has the kernel's layout (it is
    // the type seccompiler itself installs); `prog` points at `filter`,
    // which outlives the call, and the kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Installs the compiled profile, setting no_new_privs first if the kernel
/// refuses a process without CAP_SYS_ADMIN (see the module comment).
pub fn install_all(compiled: &Compiled) -> std::io::Result<()> {
    for (i, filter) in compiled.filters.iter().enumerate() {
        match install(filter, compiled.flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EACCES) && i == 0 => {
                // SAFETY: prctl with integer arguments only.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                install(filter, compiled.flags)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("profile JSON")
    }

    /// Runs a BPF program on a seccomp_data for `nr` with `args`, as the
    /// kernel would (the subset of classic BPF seccompiler emits).
    fn run(prog: &BpfProgram, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&(nr as i32).to_ne_bytes());
        #[cfg(target_arch = "x86_64")]
        data.extend_from_slice(&0xc000_003eu32.to_ne_bytes());
        #[cfg(target_arch = "aarch64")]
        data.extend_from_slice(&0xc000_00b7u32.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let word = |off: u32| {
            let off = off as usize;
            u32::from_ne_bytes(data[off..off + 4].try_into().expect("word"))
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &prog[pc];
            match ins.code {
                0x20 => acc = word(ins.k), // ld w abs
                0x06 => return ins.k,      // ret k
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match ins.code {
                        0x15 => acc == ins.k,
                        0x25 => acc > ins.k,
                        0x35 => acc >= ins.k,
                        _ => acc & ins.k != 0,
                    };
                    pc += if taken {
                        ins.jt as usize
                    } else {
                        ins.jf as usize
                    };
                }
                0x05 => pc += ins.k as usize, // ja
                0x54 => acc &= ins.k,         // and k
                other => panic!("opcode {other:#x} not modelled"),
            }
            pc += 1;
        }
    }

    /// The kernel's verdict for the stack: the most restrictive.
    fn verdict(c: &Compiled, nr: i64, args: [u64; 6]) -> u32 {
        fn rank(ret: u32) -> u32 {
            match ret & 0xffff_0000 {
                0x8000_0000 => 0, // kill process
                0x0000_0000 => 1, // kill thread
                0x0003_0000 => 2, // trap
                0x0005_0000 => 3, // errno
                0x7ff0_0000 => 5, // trace
                0x7ffc_0000 => 6, // log
                0x7fff_0000 => 7, // allow
                _ => 4,
            }
        }
        c.filters
            .iter()
            .rev()
            .map(|f| run(f, nr, args))
            .min_by_key(|r| rank(*r))
            .unwrap_or(libc::SECCOMP_RET_ALLOW)
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }
    fn nr(name: &str) -> i64 {
        syscall_number(name).expect(name)
    }

    #[test]
    fn allow_list_with_a_restrictive_default() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[{"names":["read","write","exit_group","no_such_syscall_xyz"],"action":"SCMP_ACT_ALLOW"},
                            {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        ))
        .expect("compiles");
        // The default filter and one for ERRNO(38).
        assert_eq!(c.filters.len(), 2);
        assert_eq!(verdict(&c, nr("read"), [0; 6]), ALLOW);
        assert_eq!(verdict(&c, nr("exit_group"), [0; 6]), ALLOW);
        assert_eq!(verdict(&c, nr("mount"), [0; 6]), errno(libc::EPERM));
        assert_eq!(verdict(&c, nr("clone3"), [0; 6]), errno(libc::ENOSYS));
    }

    #[test]
    fn deny_list_with_allow_default_and_per_action_stacking() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                            {"names":["reboot"],"action":"SCMP_ACT_KILL_PROCESS"},
                            {"names":["personality"],"action":"SCMP_ACT_ERRNO",
                             "args":[{"index":0,"value":8,"op":"SCMP_CMP_NE"}]},
                            {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        ))
        .expect("compiles");
        // No default filter; ERRNO(1) (mkdir and personality: EPERM is 1)
        // and KILL_PROCESS.
        assert_eq!(c.filters.len(), 2);
        assert_eq!(verdict(&c, nr("mkdir"), [0; 6]), errno(1));
        assert_eq!(
            verdict(&c, nr("reboot"), [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(verdict(&c, nr("getpid"), [0; 6]), ALLOW);
        assert_eq!(verdict(&c, nr("personality"), [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            verdict(&c, nr("personality"), [0xffff_ffff, 0, 0, 0, 0, 0]),
            errno(1)
        );
    }

    #[test]
    fn conditions_and_masked_eq() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO",
                "syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW",
                             "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        ))
        .expect("compiles");
        assert_eq!(verdict(&c, nr("clone"), [0x11, 0, 0, 0, 0, 0]), ALLOW);
        // CLONE_NEWUSER (0x10000000) is in the mask: refused.
        assert_eq!(
            verdict(&c, nr("clone"), [0x1000_0000, 0, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
    }

    #[test]
    fn unsupported_things_name_their_field() {
        let cases = [
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_S390X"]}"#,
                "linux.seccomp.architectures[1]",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
                "linux.seccomp.syscalls[0].action",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
                "linux.seccomp.defaultAction",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
                "linux.seccomp.listenerPath",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
                "linux.seccomp.syscalls[0].args[0].index",
            ),
        ];
        for (json, field) in cases {
            let e = compile(&profile(json)).expect_err(json);
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn unknown_syscalls_are_skipped_and_allow_everything_is_no_filter() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["frobnicate"],"action":"SCMP_ACT_ERRNO"}]}"#,
        ))
        .expect("compiles");
        // ERRNO group exists but has no known syscall: it allows all.
        for f in &c.filters {
            assert_eq!(run(f, nr("read"), [0; 6]), ALLOW);
        }
        let c = compile(&profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#)).expect("compiles");
        assert!(c.filters.is_empty());
    }

    #[test]
    fn flags() {
        let c = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_LOG","flags":["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_TSYNC"]}"#,
        ))
        .expect("compiles");
        assert_eq!(c.flags, libc::SECCOMP_FILTER_FLAG_LOG as u32);
        assert_eq!(verdict(&c, nr("read"), [0; 6]), libc::SECCOMP_RET_LOG);
    }
}
