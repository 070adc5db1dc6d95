//! Replays every input kept under fuzz/regressions/<target>/ (the seeds, and each crash
//! a fuzz target found, kept once fixed) through the target's own harness, the code
//! fuzz/fuzz_targets/<target>.rs runs; so `cargo test` catches a regression without
//! cargo-fuzz or a nightly toolchain. See fuzz/README.md.

#[path = "../../fuzz/harness/manifest_json.rs"]
mod manifest_json;

#[path = "../../fuzz/harness/spec_toml.rs"]
mod spec_toml;

use std::path::{Path, PathBuf};

/// Every file under fuzz/regressions/`target`/, each through `run`; a panic names the file.
fn replay(target: &str, run: fn(&[u8])) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Err(p) = std::panic::catch_unwind(|| run(&data)) {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: {why}", file.display());
        }
    }
    files
}

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
