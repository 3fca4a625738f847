//! isola-vmm: isola's KVM microVM monitor, built on the rust-vmm crates.
//!
//! One module per concern, as in Firecracker: `arch` (memory layout,
//! CPUID, registers, MP table), `devices` (buses, serial, i8042, boot
//! timer, virtio), `boot` (loading the kernel and initrd), `vcpu` (one
//! thread per vCPU), `vm` (building and running a VM), `config` and `api`.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod vcpu;
pub mod vm;
