//! x86_64 specifics: guest memory layout, CPUID, vCPU registers, MP table.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
