//! Builds guest init (`guest/init`) as a static musl binary and hands its path to the
//! `hostd` binary, which embeds it: `hostd build` needs nothing but itself.

use std::path::PathBuf;
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in [
        "guest/init",
        "benches/workload",
        "images/src/manifest.rs",
        "images/src/abi.rs",
        "images/src/lib.rs",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=HOSTD_GUEST_PREBUILT");
    // Packagers (nix/package.nix) build guest init and the bench workload as their own
    // static derivation and point here at its bin directory.
    if let Some(dir) = std::env::var_os("HOSTD_GUEST_PREBUILT") {
        let dir = PathBuf::from(dir);
        for (bin, var) in [
            ("hostd-init", "HOSTD_INIT_PATH"),
            ("hostd-bench-workload", "HOSTD_BENCH_WORKLOAD_PATH"),
        ] {
            let dest = out.join(bin);
            place(&dir.join(bin), &dest)
                .unwrap_or_else(|e| panic!("HOSTD_GUEST_PREBUILT: cannot copy {bin}: {e}"));
            println!("cargo:rustc-env={var}={}", dest.display());
        }
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = root.join("target").join("guest-init");
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    // Paths baked into the binary (panic locations) are remapped so the same sources
    // give the same init wherever they are checked out.
    let rustflags = format!(
        "--remap-path-prefix={}=/hostd --remap-path-prefix={}=/cargo",
        root.display(),
        cargo_home.display()
    );
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "--release",
        "-p",
        "hostd-init",
        "-p",
        "hostd-bench-workload",
        "--target",
        GUEST_TARGET,
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&root)
    .env("RUSTFLAGS", rustflags)
    .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
    .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
    .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
    .env("CARGO_PROFILE_RELEASE_LTO", "true")
    .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
    .env("CARGO_PROFILE_RELEASE_PANIC", "abort");
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build guest init");
    if !status.success() {
        panic!(
            "building guest init failed. It needs the {GUEST_TARGET} target: \
             `rustup target add {GUEST_TARGET}`"
        );
    }
    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("hostd-init");
    let dest = out.join("hostd-init");
    place(&built, &dest).expect("cannot copy guest init");
    println!("cargo:rustc-env=HOSTD_INIT_PATH={}", dest.display());
    // `hostd bench` embeds its workload the same way (benches/workload).
    let built = built.with_file_name("hostd-bench-workload");
    let dest = out.join("hostd-bench-workload");
    place(&built, &dest).expect("cannot copy the bench workload");
    println!(
        "cargo:rustc-env=HOSTD_BENCH_WORKLOAD_PATH={}",
        dest.display()
    );
}

/// Copies `from` to a new file at `to`. The old file is removed first rather than
/// overwritten: a target directory copied with hard links (`cp -al`, to share compiled
/// dependencies between checkouts) would otherwise have this write change the other
/// checkout's embedded guest binary too.
fn place(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    match std::fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::copy(from, to)
}
