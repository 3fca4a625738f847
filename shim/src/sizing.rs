//! The VM's size: the config's defaults (which allow-listed annotations may
//! change), plus what the sandbox's own OCI resources ask for, as Kata adds
//! a container's limits to its default VM. A container that later joins the
//! VM must fit into it: the guest enforces its limits as cgroups, but cannot
//! give it more than the VM has.

use oci_spec::runtime::Spec;

/// vCPUs and memory of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// What a spec's `linux.resources` ask for: whole vCPUs (the CPU quota
/// rounded up) and MiB (the memory limit rounded up), 0 where unlimited.
pub fn requested(spec: &Spec) -> (u32, u32) {
    let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
        return (0, 0);
    };
    let mut vcpus = 0;
    if let Some(cpu) = resources.cpu() {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                let n = (quota as u64).div_ceil(period);
                vcpus = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
    }
    let mut memory_mib = 0;
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
        if limit > 0 {
            let mib = (limit as u64).div_ceil(1 << 20);
            memory_mib = u32::try_from(mib).unwrap_or(u32::MAX);
        }
    }
    (vcpus, memory_mib)
}

/// The size of a VM whose first container has `spec`: `base` (the
/// defaults) plus what the spec asks for, within the maxima.
pub fn for_sandbox(
    base: VmSize,
    max: VmSize,
    spec: &Spec,
    config_file: &str,
) -> Result<VmSize, String> {
    let (vcpus, memory_mib) = requested(spec);
    let size = VmSize {
        vcpus: base.vcpus.saturating_add(vcpus),
        memory_mib: base.memory_mib.saturating_add(memory_mib),
    };
    if size.vcpus > max.vcpus {
        return Err(format!(
            "the sandbox needs {} vCPUs ({} by default + {} for its CPU quota), more than \
             max_vcpus = {} in {config_file}",
            size.vcpus, base.vcpus, vcpus, max.vcpus
        ));
    }
    if size.memory_mib > max.memory_mib {
        return Err(format!(
            "the sandbox needs {} MiB ({} MiB by default + {} MiB for its memory limit), more \
             than max_memory_mib = {} in {config_file}",
            size.memory_mib, base.memory_mib, memory_mib, max.memory_mib
        ));
    }
    Ok(size)
}

/// Checks that a container joining a VM of `vm` size fits into it.
pub fn check_fits(vm: VmSize, spec: &Spec) -> Result<(), String> {
    let (vcpus, memory_mib) = requested(spec);
    if memory_mib > vm.memory_mib {
        return Err(format!(
            "the container's memory limit is {memory_mib} MiB, more than its sandbox VM has \
             ({} MiB)",
            vm.memory_mib
        ));
    }
    if vcpus > vm.vcpus {
        return Err(format!(
            "the container's CPU quota asks for {vcpus} vCPUs, more than its sandbox VM has ({})",
            vm.vcpus
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, SpecBuilder,
    };

    fn spec(quota: Option<i64>, period: Option<u64>, limit: Option<i64>) -> Spec {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(q) = quota {
            cpu = cpu.quota(q);
        }
        if let Some(p) = period {
            cpu = cpu.period(p);
        }
        let mut memory = LinuxMemoryBuilder::default();
        if let Some(l) = limit {
            memory = memory.limit(l);
        }
        let resources = LinuxResourcesBuilder::default()
            .cpu(cpu.build().expect("cpu"))
            .memory(memory.build().expect("memory"))
            .build()
            .expect("resources");
        SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .resources(resources)
                    .build()
                    .expect("linux"),
            )
            .build()
            .expect("spec")
    }

    const BASE: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 256,
    };
    const MAX: VmSize = VmSize {
        vcpus: 4,
        memory_mib: 2048,
    };

    #[test]
    fn no_resources_give_the_defaults() {
        let s = SpecBuilder::default().build().expect("spec");
        assert_eq!(requested(&s), (0, 0));
        assert_eq!(for_sandbox(BASE, MAX, &s, "f"), Ok(BASE));
        assert_eq!(
            for_sandbox(BASE, MAX, &spec(None, None, None), "f"),
            Ok(BASE)
        );
    }

    #[test]
    fn quota_and_limit_are_added_rounded_up() {
        // 1.5 CPUs → 2 more vCPUs; 100 MiB + 1 byte → 101 MiB more.
        let s = spec(Some(150_000), Some(100_000), Some((100 << 20) + 1));
        assert_eq!(requested(&s), (2, 101));
        assert_eq!(
            for_sandbox(BASE, MAX, &s, "f"),
            Ok(VmSize {
                vcpus: 3,
                memory_mib: 357
            })
        );
    }

    #[test]
    fn unlimited_values_add_nothing() {
        let s = spec(Some(-1), Some(100_000), Some(-1));
        assert_eq!(requested(&s), (0, 0));
    }

    #[test]
    fn beyond_the_maxima_is_an_error_naming_both() {
        let err = for_sandbox(
            BASE,
            MAX,
            &spec(Some(400_000), Some(100_000), None),
            "/c.toml",
        )
        .expect_err("too many vcpus");
        assert!(
            err.contains("5 vCPUs") && err.contains("max_vcpus = 4 in /c.toml"),
            "{err}"
        );
        let err = for_sandbox(BASE, MAX, &spec(None, None, Some(4 << 30)), "/c.toml")
            .expect_err("too much memory");
        assert!(
            err.contains("4352 MiB") && err.contains("max_memory_mib = 2048"),
            "{err}"
        );
    }

    #[test]
    fn a_joining_container_must_fit() {
        let vm = VmSize {
            vcpus: 2,
            memory_mib: 512,
        };
        assert_eq!(check_fits(vm, &spec(None, None, Some(512 << 20))), Ok(()));
        let err = check_fits(vm, &spec(None, None, Some(1 << 30))).expect_err("too big");
        assert!(err.contains("1024 MiB") && err.contains("512 MiB"), "{err}");
        let err = check_fits(vm, &spec(Some(300_000), Some(100_000), None)).expect_err("cpus");
        assert!(err.contains("3 vCPUs") && err.contains("(2)"), "{err}");
    }
}
