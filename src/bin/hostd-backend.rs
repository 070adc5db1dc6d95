//! `hostd-backend backend …`: the device backends alone, as a small program (issue #18).
//!
//! `hostd run` starts each device backend by executing this binary when it sits next to
//! `hostd` (else `hostd backend …`, the same code). Re-executing all of `hostd` costs each
//! backend the relocation of that binary's read-only-after-relocation data (2.7 MiB of
//! private memory per backend with the debug build) and the mapping of a 400 MB file;
//! this binary links only the device backends, so each backend pays a fraction of it.
//! Same arguments, same jail: the code is `hostd backend`'s (src/backend_cmd.rs).
//! Started without the standard library's runtime set-up (src/vm_start.rs says why).
#![no_main]

#[path = "../backend_cmd.rs"]
mod backend_cmd;
#[path = "../vm_log.rs"]
mod vm_log;
#[path = "../vm_start.rs"]
mod vm_start;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hostd-backend",
    about = "hostd's device backends (started by `hostd run`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A device backend process (started by `hostd run`; not for direct use).
    Backend {
        #[command(subcommand)]
        cmd: backend_cmd::BackendCommand,
    },
}

#[no_mangle]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    vm_start::init();
    vm_log::init();
    // SAFETY: the C library's arguments to `main`.
    let args = unsafe { vm_start::args(argc, argv) };
    // `hostd run`'s command lines without clap (backend_cmd::quick_args says why); clap
    // for anything else, and for help and errors.
    let quick = match args.get(1) {
        Some(first) if first == "backend" => backend_cmd::quick_args(&args[2..]),
        _ => None,
    };
    let cmd = quick.unwrap_or_else(|| {
        let Command::Backend { cmd } = Cli::parse_from(&args).command;
        cmd
    });
    match backend_cmd::run(cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hostd-backend: error: {e:#}");
            std::process::exit(1);
        }
    }
}
