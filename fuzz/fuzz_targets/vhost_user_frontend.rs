#![no_main]

#[path = "../harness/vhost_user_frontend.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
