#![no_main]
//! See isola_vmm::fuzzing::vsock_chains.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::vsock_chains(data));
