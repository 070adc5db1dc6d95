//! `hostd`: an immutable service host. CLI wiring only; the work is in the crates.
//!
//! Two executables share this command line. `hostd` (src/main.rs) runs `hostd run` (and
//! `hostd backend`) itself and hands every other subcommand to `hostd-full`
//! (src/bin/hostd-full.rs), which has them all. `hostd run` is on the path of every VM's
//! start, and a position-independent executable relocates its read-only-after-relocation
//! data at each exec: with the WebAssembly tier linked in (wasmtime, cranelift, tokio,
//! rustls) that is 52,400 relocations over 817 KB; `hostd` alone has 7,547 over 120 KB
//! (`hostd --version`: 194 page faults and 1.2 ms instead of 416 and 2.7 ms; `hostd run`
//! of the probe peaks at 4.9 MB instead of 8.0 MB; docs/startup.md). The linker drops
//! what `hostd`'s `main::<false>` cannot reach.
//!
//! Without the `full` feature (on by default) only `hostd` and `hostd-backend` are
//! built, with none of the other subcommands' dependencies: that is how the VM path is
//! built for musl, as shipped and tested (docs/startup.md, "musl"; tests/common's
//! `hostd_exe`): each start runs 2,500-3,200 fewer distinct instructions than with
//! glibc, which counts in the nested test host, where code run once is translated once.

mod backend_cmd;
#[cfg(feature = "full")]
mod bench_cmd;
#[cfg(feature = "full")]
mod cap_cmd;
mod cap_relay;
mod cli;
#[cfg(feature = "full")]
mod daemon_cmd;
#[cfg(feature = "full")]
mod fn_cmd;
mod image_cmd;
mod interrupt;
#[cfg(feature = "full")]
mod oci_cmd;
#[cfg(feature = "full")]
mod progress;
mod quick_args;
#[cfg(feature = "full")]
mod systemd_cmd;
mod vm_log;

pub use cli::main;

/// The executable with every subcommand, next to `hostd`.
const FULL_EXE: &str = "hostd-full";

#[cfg(feature = "full")]
/// The `hostd` to start `hostd run` with: this executable, or `hostd` next to it when
/// this is `hostd-full` (so that a VM's start does not load the WebAssembly tier).
fn hostd_exe() -> std::io::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == FULL_EXE) {
        let thin = me.with_file_name("hostd");
        if thin.is_file() {
            return Ok(thin);
        }
    }
    Ok(me)
}
