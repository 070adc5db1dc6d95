#![no_main]

#[path = "../harness/block_chain.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
