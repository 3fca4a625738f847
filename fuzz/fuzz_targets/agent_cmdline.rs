#![no_main]
//! The agent's `agent.*` options on the kernel command line: see
//! `fuzz_cmdline` in agent/src/config.rs.
#[allow(dead_code)]
#[path = "../../agent/src/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config::fuzz_cmdline(data));
