#![no_main]

#[path = "../harness/manifest_json.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
