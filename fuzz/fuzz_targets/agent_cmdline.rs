#![no_main]
//! The agent's `agent.*` options on the kernel command line.
#[allow(dead_code)]
#[path = "../../agent/src/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = config::Config::from_cmdline(&String::from_utf8_lossy(data));
});
