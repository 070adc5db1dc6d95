//! Replays every input kept under fuzz/regressions/<target>/ (the seeds, and each crash
//! a fuzz target found, kept once fixed) through the target's own harness, the code
//! fuzz/fuzz_targets/<target>.rs runs; so `cargo test` catches a regression without
//! cargo-fuzz or a nightly toolchain. See fuzz/README.md.

#[path = "../../fuzz/harness/image_and_kernel.rs"]
mod image_and_kernel;

#[path = "../../fuzz/harness/snapshot_file.rs"]
mod snapshot_file;

#[path = "../../fuzz/harness/replay.rs"]
mod replay;
use replay::replay;

#[test]
fn image_and_kernel_regressions_replay_clean() {
    replay("image_and_kernel", image_and_kernel::run);
}

#[test]
fn snapshot_file_regressions_replay_clean() {
    replay("snapshot_file", snapshot_file::run);
}
