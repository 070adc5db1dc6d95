#![no_main]

#[path = "../harness/image_and_kernel.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
