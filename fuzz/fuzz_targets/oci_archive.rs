#![no_main]

#[path = "../harness/oci_archive.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
