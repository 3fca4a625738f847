#![no_main]
//! See isola_vmm::fuzzing::api_request.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_vmm::fuzzing::api_request(data));
