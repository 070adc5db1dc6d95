//! `hostd`: `hostd run` and the device backends here; every other subcommand is handed
//! to `hostd-full` (src/lib.rs).

fn main() {
    hostd::main::<false>();
}
