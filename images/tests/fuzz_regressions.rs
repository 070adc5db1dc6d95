//! Replays every input kept under fuzz/regressions/<target>/ (the seeds, and each crash
//! a fuzz target found, kept once fixed) through the target's own harness, the code
//! fuzz/fuzz_targets/<target>.rs runs; so `cargo test` catches a regression without
//! cargo-fuzz or a nightly toolchain. See fuzz/README.md.

#[path = "../../fuzz/harness/manifest_json.rs"]
mod manifest_json;

#[path = "../../fuzz/harness/spec_toml.rs"]
mod spec_toml;

#[path = "../../fuzz/harness/debian_packages.rs"]
mod debian_packages;

#[path = "../../fuzz/harness/lock_toml.rs"]
mod lock_toml;

#[path = "../../fuzz/harness/oci_archive.rs"]
mod oci_archive;

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

#[test]
fn debian_packages_regressions_replay_clean() {
    replay("debian_packages", debian_packages::run);
}

#[test]
fn lock_toml_regressions_replay_clean() {
    replay("lock_toml", lock_toml::run);
}

#[test]
fn oci_archive_regressions_replay_clean() {
    replay("oci_archive", oci_archive::run);
}

/// The new parsers' seeds are valid inputs too: the index names the packages, the lock
/// reads, the archive applies.
#[test]
fn package_lock_and_oci_seeds_are_valid() {
    for file in replay("debian_packages", |_| {}) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let index = hostd_images::packages::index::Index::parse(&text);
        assert!(
            !index.versions("busybox-static").is_empty(),
            "{}",
            file.display()
        );
    }
    for file in replay("lock_toml", |_| {}) {
        if is_seed(&file) {
            let lock = hostd_images::lock::Lock::load(&file);
            assert!(matches!(lock, Ok(Some(_))), "{}: {lock:?}", file.display());
        }
    }
    for file in replay("oci_archive", |_| {}) {
        if is_seed(&file) {
            let mut tree = hostd_images::rootfs::Tree::new();
            let r = hostd_images::oci::apply(&file, hostd_images::oci::Source::Archive, &mut tree);
            assert!(r.is_ok(), "{}: {r:?}", file.display());
            assert!(tree.get("/etc/c").is_some() && tree.get("/etc/a").is_none());
        }
    }
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
