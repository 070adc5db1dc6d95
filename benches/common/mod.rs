//! What the boot benchmarks share, from the harness `hostd bench` uses too
//! (benches/harness): spawn a monitor as a child, time the lines it prints, its exit and
//! its peak RSS; medians; the JSON they write.

#![allow(dead_code, unused_imports)] // each bench uses a part

pub use hostd_bench::{kvm_usable, median, spawn_and_measure, Sample};

/// Writes `{"bench":NAME,<extra>"results":[RESULTS]}` to target/bench/NAME.json and says
/// where. `extra` is zero or more `"key":value,` pairs.
pub fn write_json(name: &str, extra: &str, results: &[String]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    match hostd_bench::write_bench_json(&dir, name, extra, results) {
        Ok(path) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}/{name}.json: {e}", dir.display()),
    }
}
