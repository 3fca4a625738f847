//! The guest kernel and initrd boot under QEMU microvm (the reference VMM)
//! to `isola-agent ready`, the agent sets up what it should, and the guest
//! shuts down cleanly on request.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::collections::BTreeMap;

use isola_e2e::qemu::{QemuConfig, QemuVm};
use isola_e2e::{
    require_kvm_host, state_fields, GuestImages, Scratch, BOOT_DEADLINE, READY, SHUTDOWN_DEADLINE,
};

#[test]
fn boots_to_agent_ready_sets_up_the_guest_and_powers_off_on_request() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("boot").unwrap();
    let mut config = QemuConfig::new(GuestImages::from_build_dir().unwrap());
    config.extra_cmdline = "agent.log=debug agent.hostname=e2e-guest".into();
    let mut vm = QemuVm::start(&config, &scratch.path).unwrap();

    let state = vm.console.wait_for("state: ", BOOT_DEADLINE).unwrap();
    let ready = vm.console.wait_for(READY, BOOT_DEADLINE).unwrap();
    eprintln!("ready after {:?}: {ready}", vm.started.elapsed());

    let fields = state_fields(&state);
    assert_eq!(
        fields.get("hostname").map(String::as_str),
        Some("e2e-guest"),
        "{state}"
    );
    let mounts: BTreeMap<&str, &str> = fields["mounts"]
        .split(',')
        .filter_map(|m| m.split_once(':'))
        .collect();
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/tmp", "tmpfs"),
        ("/run", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
    ] {
        assert_eq!(mounts.get(target), Some(&fstype), "{target} in {state}");
    }
    let controllers: Vec<&str> = fields["cgroup_subtree_control"].split(',').collect();
    for c in ["cpuset", "cpu", "io", "memory", "pids"] {
        assert!(
            controllers.contains(&c),
            "controller {c} not enabled: {state}"
        );
    }
    // agent.log=debug was honoured.
    assert!(
        vm.console.seen().iter().any(|l| l.contains("DEBUG")),
        "no DEBUG line with agent.log=debug:\n{}",
        vm.console.tail(20)
    );

    vm.request_power_off().unwrap();
    vm.console
        .wait_for("shutting down signal=SIGINT", SHUTDOWN_DEADLINE)
        .unwrap();
    let status = vm.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "QEMU exited with {status}");
}

#[test]
fn bad_agent_options_are_reported_and_the_guest_still_boots() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("badopt").unwrap();
    let mut config = QemuConfig::new(GuestImages::from_build_dir().unwrap());
    // One vCPU: QEMU bringing up a second vCPU has crashed or wedged in
    // the emulated KVM host (software-emulated nested SVM); isola-vmm's
    // own SMP boots are tested in vmm.rs.
    config.extra_cmdline = "agent.log=loud agent.hostname=-bad agent.frobnicate=1".into();
    let mut vm = QemuVm::start(&config, &scratch.path).unwrap();

    vm.console.wait_for(READY, BOOT_DEADLINE).unwrap();
    let seen = vm.console.seen().join("\n");
    assert!(seen.contains("agent.log: unknown level \"loud\""), "{seen}");
    assert!(
        seen.contains("agent.hostname: \"-bad\" is not a valid hostname"),
        "{seen}"
    );
    assert!(
        seen.contains("unknown option agent.frobnicate ignored"),
        "{seen}"
    );
    // The default hostname is kept, and info (the default level) is logged
    // but debug is not.
    assert!(seen.contains("hostname=isola "), "{seen}");
    assert!(!seen.contains("DEBUG"), "{seen}");

    vm.request_power_off().unwrap();
    let status = vm.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "QEMU exited with {status}");
}
