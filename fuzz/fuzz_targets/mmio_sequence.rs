#![no_main]
//! See isola_vmm::fuzzing::mmio_sequence.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::mmio_sequence(data));
