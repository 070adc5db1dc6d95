#![no_main]

#[path = "../harness/debian_packages.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
