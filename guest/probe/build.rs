//! Links the probe with its own linker script (load address 1 MiB, PT_NOTE for
//! the PVH entry note). Only for the bare-metal target: host-side unit tests
//! (`cargo test --target x86_64-unknown-linux-gnu`) link normally.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    let target = env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_string());
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    }
}
