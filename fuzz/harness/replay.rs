//! Replay of kept inputs for `cargo test` (included with `#[path]` by the regression
//! tests of the crates whose parsers the targets exercise; not a fuzz target).

use std::path::{Path, PathBuf};

/// Every file under fuzz/regressions/`target`/, each through `run`; a panic names the file.
pub fn replay(target: &str, run: fn(&[u8])) -> Vec<PathBuf> {
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
