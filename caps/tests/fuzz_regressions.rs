//! Replays every input kept under fuzz/regressions/noise_framing/ through the
//! fuzz target's own harness, so `cargo test` catches a regression without
//! cargo-fuzz. See fuzz/README.md.

#[path = "../../fuzz/harness/noise_framing.rs"]
mod noise_framing;

#[path = "../../fuzz/harness/replay.rs"]
mod replay;

#[test]
fn noise_framing_regressions_replay_clean() {
    replay::replay("noise_framing", noise_framing::run);
}
