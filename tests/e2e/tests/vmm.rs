//! isola-vmm boots the guest to the agent, sizes it as asked, obeys its
//! control API and signals, and cleans up after itself.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::path::Path;
use std::time::Duration;

use isola_e2e::agent;
use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::{
    require_kvm_host, state_fields, GuestImages, Scratch, BOOT_DEADLINE, SHUTDOWN_DEADLINE,
};
use isola_vmm::api::Request;

fn config() -> IsolaConfig {
    let mut c = IsolaConfig::new(GuestImages::from_build_dir().unwrap());
    // The agent reports what the tests check; the kernel's own log is not
    // needed (and replaying it over the emulated UART costs seconds).
    c.extra_cmdline = "quiet".into();
    c
}

/// Boots, checks the guest saw `vcpus` CPUs and about `mib` of memory, then
/// powers off through the API (Ctrl-Alt-Del) and expects exit status 0.
/// With `kernel_warnings`, the kernel's console keeps its warnings (not
/// `quiet`) and the boot must print none: a CPU the VMM (or the KVM host)
/// sets up wrong shows there first, e.g. "XSAVE consistency problem".
fn boot_and_power_off(vcpus: u32, mib: u32, kernel_warnings: bool) {
    let scratch = Scratch::new(&format!("vmm-{vcpus}-{mib}")).unwrap();
    let mut c = config();
    c.vcpus = vcpus;
    c.memory_mib = mib;
    if kernel_warnings {
        // Levels emerg..warning (0-4) reach the console, notice and info not.
        c.extra_cmdline = "loglevel=5".into();
    }
    let mut vm = IsolaVm::start(&c, &scratch.path).unwrap();
    let state = vm.console.wait_for("state: ", BOOT_DEADLINE).unwrap();
    let ready = vm.wait_ready().unwrap();
    if kernel_warnings {
        let warnings: Vec<&String> = vm
            .console
            .seen()
            .iter()
            .filter(|l| l.contains("WARNING:") || l.contains("BUG:") || l.contains("cut here"))
            .collect();
        assert!(
            warnings.is_empty(),
            "the guest kernel warned while booting: {warnings:#?}\n{}",
            vm.console.tail(60)
        );
    }
    eprintln!(
        "{vcpus} vCPU / {mib} MiB ready after {:?}: {ready}",
        vm.started.elapsed()
    );
    let fields = state_fields(&state);
    assert_eq!(fields["cpus"], vcpus.to_string(), "{state}");
    // virtio-rng seeded the guest's CRNG before the agent was ready.
    assert_eq!(fields["crng_ready"], "true", "{state}");
    // MemTotal: the guest's RAM less what the kernel keeps for itself.
    let total_kib: u64 = fields["mem_total_kib"].parse().unwrap();
    let want = u64::from(mib) * 1024;
    assert!(
        total_kib <= want && total_kib >= want * 3 / 4,
        "{state} for {mib} MiB"
    );
    // The agent answers over hybrid vsock: Check is SERVING, Version is
    // the agent's; two connections at once work.
    let socket = vm.vsock_socket.clone().unwrap();
    let rt = agent::runtime().unwrap();
    rt.block_on(async {
        let a = agent::wait_serving_hybrid(&socket, BOOT_DEADLINE)
            .await
            .unwrap();
        let b = agent::dial_hybrid(&socket, BOOT_DEADLINE).await.unwrap();
        let (va, vb) = tokio::join!(agent::version(&a), agent::version(&b));
        let (va, vb) = (va.unwrap(), vb.unwrap());
        assert_eq!(va.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(va.api_version, isola_protocol::API_VERSION);
        assert_eq!(vb.agent_version, va.agent_version);
        agent::check_serving(&b).await.unwrap();
    });

    let info = vm.api(Request::Info).unwrap();
    assert_eq!(info["ok"], true, "{info}");
    let agent_ready = info["boot_time_ms"]["agent_ready"].as_u64();
    assert!(
        agent_ready.is_some_and(|ms| ms > 0),
        "no agent_ready in {info}"
    );
    assert_eq!(info["vcpus"], vcpus, "{info}");
    assert_eq!(info["memory_mib"], mib, "{info}");
    assert_eq!(info["pid"], vm.pid(), "{info}");
    assert!(info["metrics"].is_object(), "no metrics in {info}");
    // Every thread of the VMM runs under its seccomp filter (mode 2).
    let threads = seccomp_modes(vm.pid());
    assert!(threads.len() >= 3 + vcpus as usize, "{threads:?}");
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "threads without a seccomp filter: {threads:?}"
    );

    let reply = vm
        .api(Request::Shutdown {
            timeout_ms: Some(120_000),
        })
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    vm.console
        .wait_for("shutting down signal=SIGINT", SHUTDOWN_DEADLINE)
        .unwrap();
    let status = vm.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "isola-vmm exited with {status}");
    assert!(!vm.api_socket.exists(), "API socket left behind");
}

/// (thread name, `Seccomp:` mode) of every thread of process `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A short-lived API client thread may be gone already.
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out
}

#[test]
fn boots_1_vcpu_128_mib() {
    require_kvm_host().unwrap();
    boot_and_power_off(1, 128, false);
}

#[test]
fn boots_2_vcpus_512_mib() {
    require_kvm_host().unwrap();
    boot_and_power_off(2, 512, true);
}

#[test]
fn pause_and_resume_keep_the_guest_alive() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("vmm-pause").unwrap();
    let mut vm = IsolaVm::start(&config(), &scratch.path).unwrap();
    vm.wait_ready().unwrap();

    let paused = vm.api(Request::Pause).unwrap();
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(vm.api(Request::Info).unwrap()["state"], "paused");
    let resumed = vm.api(Request::Resume).unwrap();
    assert_eq!(resumed["state"], "running", "{resumed}");

    // Alive: the guest still handles the power-off request.
    vm.api(Request::Shutdown {
        timeout_ms: Some(120_000),
    })
    .unwrap();
    vm.console
        .wait_for("shutting down signal=SIGINT", SHUTDOWN_DEADLINE)
        .unwrap();
    assert!(vm.wait_exit(SHUTDOWN_DEADLINE).unwrap().success());
}

#[test]
fn sigterm_stops_the_vm_and_leaves_no_socket() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("vmm-sigterm").unwrap();
    let mut vm = IsolaVm::start(&config(), &scratch.path).unwrap();
    vm.wait_ready().unwrap();
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "isola-vmm exited with {status} on SIGTERM"
    );
    assert!(!vm.api_socket.exists(), "API socket left behind");
    if let Some(v) = &vm.vsock_socket {
        assert!(!v.exists(), "vsock socket left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&scratch.path).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "left in the scratch dir: {leftovers:?}"
    );
}

#[test]
fn boots_a_bzimage_through_the_linux_64bit_entry() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("vmm-bzimage").unwrap();
    let mut c = config();
    c.images.kernel = isola_e2e::project_dir().join("build/bzImage");
    assert!(
        c.images.kernel.exists(),
        "build/bzImage missing: run `make`"
    );
    let mut vm = IsolaVm::start(&c, &scratch.path).unwrap();
    vm.wait_ready().unwrap();
    assert!(
        vm.log().iter().any(|l| l.contains("bzImage 64-bit")),
        "not booted as a bzImage: {:?}",
        vm.log()
    );
    let rt = agent::runtime().unwrap();
    rt.block_on(async {
        let socket = vm.vsock_socket.clone().unwrap();
        agent::wait_serving_hybrid(&socket, BOOT_DEADLINE)
            .await
            .unwrap();
    });
    vm.api(Request::Shutdown {
        timeout_ms: Some(120_000),
    })
    .unwrap();
    assert!(vm.wait_exit(SHUTDOWN_DEADLINE).unwrap().success());
}

/// A field of `/proc/PID/smaps_rollup`, in KiB.
fn smaps_kib(pid: u32, field: &str) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {rollup}"))
}

/// A template VM saved through the API starts clones without a boot: each
/// clone's agent answers (the template's vsock streams are reset, its
/// listener stays), each clone writes only its own copy-on-write pages of
/// the template's memory file (the file stays as saved, and a clone's
/// private memory is a fraction of what the template touched), and a
/// clone still powers off through the API or stops on SIGTERM.
#[test]
fn a_saved_template_starts_clones_that_share_its_memory() {
    use std::os::unix::fs::MetadataExt;
    require_kvm_host().unwrap();
    // On tmpfs, as the node's templates: a clone's fault on a hole of the
    // memory file there would add a page to the file.
    let scratch = Scratch::in_run("vmm-template").unwrap();
    let dir = scratch.path.join("template");
    std::fs::create_dir(&dir).unwrap();
    let rt = agent::runtime().unwrap();

    let template_scratch = scratch.path.join("template-vm");
    std::fs::create_dir(&template_scratch).unwrap();
    let mut c = config();
    c.extra_args = vec!["--template".into(), dir.display().to_string()];
    let mut template = IsolaVm::start(&c, &template_scratch).unwrap();
    template.wait_ready().unwrap();
    let socket = template.vsock_socket.clone().unwrap();
    rt.block_on(async {
        let health = agent::wait_serving_hybrid(&socket, BOOT_DEADLINE)
            .await
            .unwrap();
        // A stream still open when the template is saved.
        std::mem::forget(health);
    });
    let saved = template.api(Request::Snapshot).unwrap();
    assert_eq!(saved["ok"], true, "{saved}");
    let status = template.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "the template VMM exited with {status}");
    let memory = dir.join("memory");
    let before = std::fs::metadata(&memory).unwrap();
    let touched_kib = before.blocks() * 512 / 1024;
    assert!(
        touched_kib > 8 * 1024,
        "the template touched {touched_kib} KiB"
    );
    assert!(dir.join("state.json").is_file());

    let mut clones = Vec::new();
    for i in 0..2 {
        let clone_scratch = scratch.path.join(format!("clone-{i}"));
        std::fs::create_dir(&clone_scratch).unwrap();
        let mut c = config();
        c.restore = Some(dir.clone());
        clones.push(IsolaVm::start(&c, &clone_scratch).unwrap());
    }
    for clone in &clones {
        let socket = clone.vsock_socket.clone().unwrap();
        let version = rt.block_on(async {
            let health = agent::wait_serving_hybrid(&socket, BOOT_DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("{e:#}\nVMM log:\n{}", clone.log().join("\n")));
            agent::version(&health).await.unwrap()
        });
        assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
        let info = clone.api(Request::Info).unwrap();
        assert_eq!(info["state"], "running", "{info}");
        assert_eq!(info["memory_mib"], c.memory_mib, "{info}");
    }
    for clone in &clones {
        let pid = clone.pid();
        let (rss, pss, private) = (
            smaps_kib(pid, "Rss"),
            smaps_kib(pid, "Pss"),
            smaps_kib(pid, "Private_Dirty"),
        );
        eprintln!(
            "clone {pid}: Rss {rss} KiB, Pss {pss} KiB, Private_Dirty {private} KiB; \
             the template touched {touched_kib} KiB"
        );
        assert!(
            private < touched_kib / 2,
            "clone {pid} has {private} KiB of private memory for a template of {touched_kib} KiB"
        );
        // Guest RAM is registered with a userfaultfd (smaps' `uw`), so
        // the host maps the pages the guest reads and not 64 KiB around
        // each (fault-around).
        let file = std::fs::canonicalize(&memory).unwrap();
        let maps: Vec<_> = isola_e2e::procstat::mappings(pid)
            .unwrap()
            .into_iter()
            .filter(|m| Path::new(&m.name) == file)
            .collect();
        assert!(
            !maps.is_empty(),
            "clone {pid} does not map {}",
            memory.display()
        );
        for m in &maps {
            assert!(
                m.has_flag("uw"),
                "clone {pid} maps the template's memory with fault-around: VmFlags {}",
                m.flags
            );
        }
        let mapped: u64 = maps.iter().map(|m| m.rss_kib).sum();
        eprintln!(
            "clone {pid}: maps {mapped} KiB of the template's memory in {} mappings",
            maps.len()
        );
    }
    let after = std::fs::metadata(&memory).unwrap();
    assert_eq!(
        (after.mtime(), after.mtime_nsec(), after.len()),
        (before.mtime(), before.mtime_nsec(), before.len()),
        "a clone changed the template's memory file"
    );
    // The clones booted their agents and ran: they touched memory the
    // template never did, and none of it went into the file.
    assert_eq!(
        after.blocks(),
        before.blocks(),
        "clones filled holes of the template's memory file"
    );

    let mut first = clones.remove(0);
    let reply = first
        .api(Request::Shutdown {
            timeout_ms: Some(120_000),
        })
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let status = first.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "a clone exited with {status}");
    let mut second = clones.remove(0);
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(second.pid() as i32, libc::SIGTERM) }, 0);
    let status = second.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "a clone exited with {status} on SIGTERM");
}
