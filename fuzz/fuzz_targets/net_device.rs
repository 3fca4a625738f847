#![no_main]
//! See isola_vmm::fuzzing::net_device.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::net_device(data));
