//! Replays every input kept under fuzz/regressions/<target>/ (the seeds, and each crash
//! a fuzz target found, kept once fixed) through the target's own harness, the code
//! fuzz/fuzz_targets/<target>.rs runs; so `cargo test` catches a regression without
//! cargo-fuzz or a nightly toolchain. See fuzz/README.md.

#[path = "../../fuzz/harness/manifest_json.rs"]
mod manifest_json;

#[path = "../../fuzz/harness/spec_toml.rs"]
mod spec_toml;

#[path = "../../fuzz/harness/replay.rs"]
mod replay;
use replay::replay;
use std::path::Path;

#[test]
fn manifest_json_regressions_replay_clean() {
    replay("manifest_json", manifest_json::run);
}

#[test]
fn spec_toml_regressions_replay_clean() {
    replay("spec_toml", spec_toml::run);
}

/// The seeds are valid inputs (so the fuzzer starts from real manifests and specs).
#[test]
fn manifest_and_spec_seeds_parse() {
    for file in replay("manifest_json", |_| {}) {
        if is_seed(&file) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            if let Err(e) = hostd_images::manifest::Manifest::from_json(&bytes) {
                panic!("{}: {e}", file.display());
            }
        }
    }
    for file in replay("spec_toml", |_| {}) {
        if is_seed(&file) {
            if let Err(e) = hostd_images::spec::Spec::load(&file) {
                panic!("{e}");
            }
        }
    }
}

fn is_seed(file: &Path) -> bool {
    file.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("seed-"))
}
