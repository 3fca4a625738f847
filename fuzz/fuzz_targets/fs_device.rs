#![no_main]
//! See isola_vmm::fuzzing::fs_device.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::fs_device(data));
