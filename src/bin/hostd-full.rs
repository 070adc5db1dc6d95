//! `hostd-full`: every subcommand of `hostd` (src/lib.rs), which hands it those that
//! `hostd` itself does not run.

fn main() {
    hostd::main::<true>(std::env::args_os().collect());
}
