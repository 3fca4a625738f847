#![no_main]
//! See `isola_protocol::hybrid::fuzzing::answer`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_protocol::hybrid::fuzzing::answer(data));
