#![no_main]

#[path = "../harness/virtio_mmio.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
