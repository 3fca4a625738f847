#![no_main]
//! See `isola_protocol::stream::fuzzing::line`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| isola_protocol::stream::fuzzing::line(data));
