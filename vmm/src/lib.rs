//! isola-vmm: isola's KVM microVM monitor, built on the rust-vmm crates.
//!
//! One module per concern, as in Firecracker: `arch` (memory layout,
//! CPUID, registers, MP table), `devices` (buses, serial, i8042, boot
//! timer, console, virtio), `device_manager` (windows, IRQs, buses),
//! `boot` (loading the kernel and initrd), `vcpu` (one thread per vCPU),
//! `vm` (building a VM), `runtime` (the running VM's event loop),
//! `guest_log` and `metrics` (bounded, counted guest-triggered logs),
//! `config` and `api`, `jail` (the VMM confining itself).

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod fault_around;
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_log;
pub mod jail;
pub mod metrics;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
