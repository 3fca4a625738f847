#![no_main]
//! See isola_vmm::fuzzing::connect_line.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::connect_line(data));
