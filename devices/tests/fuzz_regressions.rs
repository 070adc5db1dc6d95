//! Replays every input kept under fuzz/regressions/<target>/ (the seeds, and each crash
//! a fuzz target found, kept once fixed) through the target's own harness, the code
//! fuzz/fuzz_targets/<target>.rs runs; so `cargo test` catches a regression without
//! cargo-fuzz or a nightly toolchain. See fuzz/README.md.

#[path = "../../fuzz/harness/virtio_mmio.rs"]
mod virtio_mmio;

#[path = "../../fuzz/harness/block_chain.rs"]
mod block_chain;

#[path = "../../fuzz/harness/net_chain.rs"]
mod net_chain;

#[path = "../../fuzz/harness/vsock_chain.rs"]
mod vsock_chain;

#[path = "../../fuzz/harness/vhost_user_frontend.rs"]
mod vhost_user_frontend;

#[path = "../../fuzz/harness/replay.rs"]
mod replay;
use replay::replay;

#[test]
fn virtio_mmio_regressions_replay_clean() {
    replay("virtio_mmio", virtio_mmio::run);
}

#[test]
fn block_chain_regressions_replay_clean() {
    replay("block_chain", block_chain::run);
}

#[test]
fn net_chain_regressions_replay_clean() {
    replay("net_chain", net_chain::run);
}

#[test]
fn vsock_chain_regressions_replay_clean() {
    replay("vsock_chain", vsock_chain::run);
}

#[test]
fn vhost_user_frontend_regressions_replay_clean() {
    replay("vhost_user_frontend", vhost_user_frontend::run);
}
