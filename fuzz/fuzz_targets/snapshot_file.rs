#![no_main]

#[path = "../harness/snapshot_file.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
