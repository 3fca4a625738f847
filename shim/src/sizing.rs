//! The VM's size: the config's defaults (which allow-listed annotations may
//! change), plus what the sandbox's own OCI resources ask for, as Kata adds
//! a container's limits to its default VM. A container that later joins the
//! VM must fit into it: the guest enforces its limits as cgroups, but cannot
//! give it more than the VM has.
//!
//! A Kubernetes pod's sandbox (pause) container asks for nothing itself:
//! its pod's size comes in the annotations containerd's CRI plugin copies
//! from `PodSandboxConfig.linux.resources` (kubelet ≥ 1.23 sums the pod's
//! container limits there). Debian's containerd 1.6.20 sets them; where
//! they are present they size the VM, otherwise the spec's resources do.

use std::collections::HashMap;

use oci_spec::runtime::Spec;

/// The CRI plugin's pod sizing annotations (on the sandbox container).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

fn vcpus_for(quota: i64, period: i64) -> u32 {
    if quota > 0 && period > 0 {
        u32::try_from((quota as u64).div_ceil(period as u64)).unwrap_or(u32::MAX)
    } else {
        0
    }
}

fn mib_for(limit: i64) -> u32 {
    if limit > 0 {
        u32::try_from((limit as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX)
    } else {
        0
    }
}

/// What a pod asks for in the CRI sizing annotations, if containerd set
/// any: (vCPUs, MiB). A value that is not an integer is an error naming
/// the annotation.
pub fn pod_requested(annotations: &HashMap<String, String>) -> Result<Option<(u32, u32)>, String> {
    let get = |key: &str| -> Result<Option<i64>, String> {
        annotations
            .get(key)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("annotation {key}={v:?}: not an integer"))
            })
            .transpose()
    };
    let (quota, period, memory) = (
        get(SANDBOX_CPU_QUOTA)?,
        get(SANDBOX_CPU_PERIOD)?,
        get(SANDBOX_MEMORY)?,
    );
    if quota.is_none() && period.is_none() && memory.is_none() {
        return Ok(None);
    }
    Ok(Some((
        vcpus_for(quota.unwrap_or(0), period.unwrap_or(0)),
        mib_for(memory.unwrap_or(0)),
    )))
}

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
    let vcpus = resources
        .cpu()
        .as_ref()
        .and_then(|cpu| Some(vcpus_for(cpu.quota()?, i64::try_from(cpu.period()?).ok()?)))
        .unwrap_or(0);
    let memory_mib = resources
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .map_or(0, mib_for);
    (vcpus, memory_mib)
}

/// The size of a VM whose first container has `spec`: `base` (the
/// defaults: the VM's own part, guest kernel and agent) plus what the pod
/// asks for (its CRI sizing annotations, else the spec's resources),
/// within the maxima.
pub fn for_sandbox(
    base: VmSize,
    max: VmSize,
    spec: &Spec,
    config_file: &str,
) -> Result<VmSize, String> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let (vcpus, memory_mib) = match pod_requested(annotations)? {
        Some(pod) => pod,
        None => requested(spec),
    };
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

    fn with_annotations(mut s: Spec, pairs: &[(&str, &str)]) -> Spec {
        s.set_annotations(Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s
    }

    #[test]
    fn a_pods_sizing_annotations_win_over_the_pause_containers_spec() {
        // kubelet summed 1.5 CPUs and 192 MiB; the pause spec asks for 0.1.
        let s = with_annotations(
            spec(Some(10_000), Some(100_000), None),
            &[
                (SANDBOX_CPU_QUOTA, "150000"),
                (SANDBOX_CPU_PERIOD, "100000"),
                (SANDBOX_MEMORY, "201326592"),
            ],
        );
        assert_eq!(
            for_sandbox(BASE, MAX, &s, "f"),
            Ok(VmSize {
                vcpus: 3,
                memory_mib: 448
            })
        );
        // containerd writes "0" for a pod without limits: the defaults.
        let s = with_annotations(
            spec(Some(300_000), Some(100_000), None),
            &[
                (SANDBOX_CPU_QUOTA, "0"),
                (SANDBOX_CPU_PERIOD, "100000"),
                (SANDBOX_MEMORY, "0"),
            ],
        );
        assert_eq!(for_sandbox(BASE, MAX, &s, "f"), Ok(BASE));
        let s = with_annotations(spec(None, None, None), &[(SANDBOX_MEMORY, "lots")]);
        let err = for_sandbox(BASE, MAX, &s, "f").expect_err("bad annotation");
        assert!(
            err.contains(SANDBOX_MEMORY) && err.contains("lots"),
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
