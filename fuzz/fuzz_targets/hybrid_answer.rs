#![no_main]
//! The VMM's answer to a host's `CONNECT`, as the host side parses it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = isola_protocol::hybrid::parse_answer(data);
});
